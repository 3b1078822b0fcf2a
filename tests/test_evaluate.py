"""The evaluate stage: sampling plan, resumable Ray sampling, ADM samples.npz, references, metrics."""
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sddit.checkpoint import rng_state, save_checkpoint
from sddit.data import Manifest, read_shard
from sddit.extractors import InceptionExtractor
from sddit.reference import load_reference, make_extractor, reference_from_dataset, reference_from_npz
from sddit.sampling import EvaluationError, SamplingPlan, batch_path
from sddit.training import build_training
from tests.conftest import tiny_config
from tests.fixtures import TINY

NUM_CLASSES = 3                                         # the image_tree fixture's classes
EVAL_ARGS = ["--num-samples", "12", "--batch-size", "4", "--steps", "2", "--cfg-scale", "1.5", "--seed", "7"]


@pytest.fixture(scope="module")
def pixel_dataset(ray_session, image_tree, mlflow_dir, tmp_path_factory):
    from pipelines.encode import main as encode
    root, _ = image_tree
    out = tmp_path_factory.mktemp("eval-data") / "pixels8"
    encode(["--data", str(root), "--out", str(out), "--run-dir", str(mlflow_dir), "--codec", "pixel",
            "--resolution", "8", "--rows-per-shard", "16"])
    return out


@pytest.fixture(scope="module")
def checkpoint(pixel_dataset, tmp_path_factory):
    config = tiny_config("SD-DiT-S/2", in_channels=3, num_classes=NUM_CLASSES)
    torch.manual_seed(0)
    model, optimizer, ema, _ = build_training(config)
    with torch.no_grad():                               # away from the zero-initialised output layers
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dataset = {"dir": str(pixel_dataset), "codec": "pixel", "vae": None, "column": "pixels", "scaling_factor": 1.0,
               "latent_shape": [3, 8, 8], "num_classes": NUM_CLASSES, "resolution": 8}
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step-123", config=config, model=model,
                           generation_ema=ema, optimizer=optimizer, step=123, images_seen=0, data_position={},
                           rng=rng_state(), dataset=dataset)


def run_evaluate(checkpoint, out, mlflow_dir, *extra):
    from pipelines.evaluate import main
    return main(["--checkpoint", str(checkpoint), "--out", str(out), "--run-dir", str(mlflow_dir), *EVAL_ARGS, *extra])


@pytest.fixture(scope="module")
def domain_run(checkpoint, mlflow_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "domain"
    return out, run_evaluate(checkpoint, out, mlflow_dir, "--extractor", "domain")


@pytest.fixture(scope="module")
def random_inception():
    return InceptionExtractor.random(seed=0, batch_size=16)


# --- the plan ------------------------------------------------------------------------------------------------------

def test_plan_labels_are_balanced_and_noise_does_not_depend_on_batching():
    plan = SamplingPlan(num_samples=12, batch_size=5, num_classes=3, latent_shape=[2, 4, 4])
    assert plan.num_batches == 3 and list(plan.batch_indices(2)) == [10, 11]
    labels = np.concatenate([plan.labels(plan.batch_indices(b)) for b in range(plan.num_batches)])
    assert np.bincount(labels).tolist() == [4, 4, 4]
    other = SamplingPlan(num_samples=12, batch_size=3, num_classes=3, latent_shape=[2, 4, 4])
    rebatched = torch.cat([other.noise(other.batch_indices(b)) for b in (1, 2, 3)])     # samples 3..11
    assert torch.equal(plan.noise(plan.batch_indices(1)), rebatched[2:7])
    assert not torch.equal(plan.noise([0]), SamplingPlan(12, 5, 3, [2, 4, 4], seed=1).noise([0]))
    assert SamplingPlan(4, 2, 0, [1, 2, 2]).labels([0, 1]) is None
    with pytest.raises(EvaluationError, match="batch_size must be >= 1"):
        SamplingPlan(4, 0, 3, [1, 2, 2])


def test_plan_label_modes():
    exact = SamplingPlan(num_samples=12, batch_size=5, num_classes=3, latent_shape=[2, 4, 4], label_mode="exact")
    balanced = SamplingPlan(num_samples=12, batch_size=5, num_classes=3, latent_shape=[2, 4, 4])
    assert np.array_equal(exact.labels(np.arange(12)), balanced.labels(np.arange(12)))
    with pytest.raises(EvaluationError, match="'exact' needs num_samples divisible by the 3 classes, got 10"):
        SamplingPlan(num_samples=10, batch_size=5, num_classes=3, latent_shape=[2, 4, 4], label_mode="exact")
    random = SamplingPlan(num_samples=300, batch_size=7, num_classes=3, latent_shape=[2, 4, 4], label_mode="random")
    drawn = random.labels(np.arange(300))
    assert set(drawn.tolist()) == {0, 1, 2} and not np.array_equal(drawn, balanced.labels(np.arange(300)))
    assert np.array_equal(random.labels(np.arange(100, 110)), drawn[100:110])      # per sample, not per batch
    again = SamplingPlan(num_samples=300, batch_size=7, num_classes=3, latent_shape=[2, 4, 4], label_mode="random",
                         seed=1)
    assert not np.array_equal(again.labels(np.arange(300)), drawn)
    with pytest.raises(EvaluationError, match="label_mode 'uniform'"):
        SamplingPlan(4, 2, 3, [1, 2, 2], label_mode="uniform")


@pytest.mark.parametrize("field, value, message", [
    ("guidance_interval", (2.0, 1.0), "guidance_interval must be"),
    ("guidance_channels", 5, r"guidance_channels must be in 1\.\.4"),
    ("precision", "fp16", "precision 'fp16'"),
])
def test_plan_refuses_bad_sampling_options(field, value, message):
    with pytest.raises(EvaluationError, match=message):
        SamplingPlan(4, 2, 3, [4, 2, 2], **{field: value})


def test_plan_options_name_the_default_output_and_reach_the_protocol():
    from pipelines.evaluate import default_out
    ckpt = Path("/runs/x/checkpoint.pt")
    assert default_out(ckpt, SamplingPlan(4, 2, 3, [4, 2, 2], steps=40, cfg_scale=1.5)) == Path("/runs/x/eval-40steps-cfg1.5")
    plan = SamplingPlan(4, 2, 3, [4, 2, 2], steps=40, cfg_scale=1.5, guidance_interval=(0.28, 5.42),
                        guidance_channels=3, label_mode="random", precision="bf16", compile=True)
    assert default_out(ckpt, plan).name == "eval-40steps-cfg1.5-interval0.28-5.42-ch3-labels-random-bf16-compiled"
    protocol = plan.to_dict()
    assert protocol["guidance_interval"] == [0.28, 5.42] and protocol["label_mode"] == "random"
    assert SamplingPlan(**json.loads(json.dumps(protocol))) == plan       # what the actors rebuild from


def test_evaluate_flags_parse_the_conventions():
    from pipelines.evaluate import parse_args
    args = parse_args(["--checkpoint", "c", "--guidance-interval", "0.28,5.42", "--guidance-channels", "3",
                       "--labels", "exact", "--precision", "bf16", "--compile"])
    assert (args.guidance_interval, args.guidance_channels, args.label_mode, args.precision, args.compile) == (
        (0.28, 5.42), 3, "exact", "bf16", True)
    for bad in ("5", "a,b", "3,1"):
        with pytest.raises(SystemExit):
            parse_args(["--checkpoint", "c", "--guidance-interval", bad])


def test_samples_of_an_older_protocol_file_are_reused_unless_an_option_differs(tmp_path):
    from sddit.sampling import check_protocol
    plan = SamplingPlan(4, 2, 3, [4, 2, 2])
    old = {k: v for k, v in plan.to_dict().items()
           if k not in ("label_mode", "guidance_interval", "guidance_channels", "precision", "compile")}
    (tmp_path / "protocol.json").write_text(json.dumps(old))   # written before these options existed
    check_protocol(tmp_path, plan.to_dict())
    with pytest.raises(EvaluationError, match="label_mode: existing 'balanced' vs requested 'random'"):
        check_protocol(tmp_path, SamplingPlan(4, 2, 3, [4, 2, 2], label_mode="random").to_dict())


def perturbed_denoiser(num_classes=3):
    from sddit.models import build_from_config
    torch.manual_seed(0)
    model = build_from_config(tiny_config("SD-DiT-S/2", in_channels=3, num_classes=num_classes).model).eval()
    with torch.no_grad():                               # away from the zero-initialised output layers
        for p in model.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.denoiser.requires_grad_(False)


def test_bf16_sampling_stays_close_to_fp32_and_is_not_the_same_computation():
    from sddit.codecs import make_codec
    from sddit.sampling import sample_batch, sampling_network
    ema, codec = perturbed_denoiser(), make_codec("pixel", None)
    fp32 = SamplingPlan(8, 8, 3, [3, 8, 8], steps=3, cfg_scale=2.0)
    bf16 = SamplingPlan(8, 8, 3, [3, 8, 8], steps=3, cfg_scale=2.0, precision="bf16")
    x32, _ = sample_batch(sampling_network(ema, fp32), codec, 0, fp32)
    x16, _ = sample_batch(sampling_network(ema, bf16), codec, 0, bf16)
    difference = np.abs(x32.astype(int) - x16.astype(int))
    assert difference.max() > 0 and difference.mean() < 2.0      # rounding, on a 0..255 scale


@pytest.mark.slow
def test_compiled_sampling_matches_eager():
    from sddit.codecs import make_codec
    from sddit.sampling import sample_batch, sampling_network
    ema, codec = perturbed_denoiser(), make_codec("pixel", None)
    eager = SamplingPlan(8, 4, 3, [3, 8, 8], steps=3, cfg_scale=2.0, guidance_interval=(0.1, 10.0))
    compiled = SamplingPlan(8, 4, 3, [3, 8, 8], steps=3, cfg_scale=2.0, guidance_interval=(0.1, 10.0), compile=True)
    network = sampling_network(ema, compiled)
    for batch in range(2):
        a, labels_a = sample_batch(sampling_network(ema, eager), codec, batch, eager)
        b, labels_b = sample_batch(network, codec, batch, compiled)
        assert np.array_equal(labels_a, labels_b)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


# --- Inception ---------------------------------------------------------------------------------------------------

def test_sfid_hook_captures_mixed_6d_branch1x1(random_inception):
    from sddit.metrics import sfid_features
    captured = {}
    handle = random_inception.net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(out=o))
    try:
        images = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
        images[0] = images[0, ..., :1]                  # a grey image, stored as RGB
        out = random_inception.extract(images)
    finally:
        handle.remove()
    assert tuple(captured["out"].shape) == (2, 192, 17, 17)
    assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    np.testing.assert_array_equal(out["spatial"], sfid_features(captured["out"]))
    weight, bias = random_inception.net.fc.weight.numpy(), random_inception.net.fc.bias.numpy()
    np.testing.assert_allclose(out["logits"], out["pool"] @ weight.T, rtol=1e-4, atol=1e-5)   # IS: no bias
    assert np.abs(bias).max() > 1e-3
    grey = random_inception.extract(images[:1, ..., :1])          # one-channel images are repeated to RGB
    np.testing.assert_allclose(grey["pool"], out["pool"][:1], rtol=1e-4, atol=1e-5)
    assert random_inception.name == "inception-random"


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's ResizeBilinear (align_corners=False) written out from its kernel, in float32 as it computes: output
    pixel i samples the input at i * (in / out) (no half-pixel offset, unlike torch's interpolate), clamped at
    the last row / column; lerp along the row first, then between rows."""
    def axis(length: int):
        position = torch.arange(size, dtype=torch.float32) * torch.tensor(length / size, dtype=torch.float32)
        low = position.floor()
        return low.long(), (low.long() + 1).clamp(max=length - 1), position - low

    (top, bottom, fy), (left, right, fx) = axis(x.shape[2]), axis(x.shape[3])
    upper, lower = x[:, :, top], x[:, :, bottom]
    upper = upper[..., left] + (upper[..., right] - upper[..., left]) * fx
    lower = lower[..., left] + (lower[..., right] - lower[..., left]) * fx
    return upper + (lower - upper) * fy[:, None]


def test_resize_follows_tf1_resize_bilinear():
    # the resize torch-fidelity's Inception applies to every input
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # output pixel i samples input position i * 2 / 4, clamped at the edge (torch's interpolate would shift by
    # half a pixel)
    expected = torch.tensor([[0.0, 5.0, 10.0, 10.0], [10.0, 15.0, 20.0, 20.0], [20.0, 25.0, 30.0, 30.0],
                             [20.0, 25.0, 30.0, 30.0]])
    assert torch.equal(interpolate_bilinear_2d_like_tensorflow1x(x, size=(4, 4), align_corners=False)[0, 0], expected)
    assert torch.equal(tf1_resize_bilinear(x, 4)[0, 0], expected)


def test_inception_matches_an_independent_fid_graph_on_a_seeded_weights_file(tmp_path, monkeypatch):
    """torch-fidelity's Inception, loaded by from_file, against the graph rebuilt without it: torchvision's
    Inception3 with pytorch-fid's FID blocks (as clean-fid ships them), the written-out TF1 resize, pool_3, the
    softmax MatMul without the bias and Mixed_6d.branch1x1 (mixed_6/conv), all from one seeded weights file."""
    from cleanfid.inception_pytorch import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models.inception import Inception3

    from sddit import extractors
    from sddit.data import file_sha256
    from sddit.metrics import sfid_features

    # a stand-in for pt_inception-2015-12-05-6726825d.pth: seeded weights, BatchNorm statistics away from identity
    state = extractors.InceptionExtractor.random(seed=1).net.state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith(("bn.weight", "bn.running_var")):
            value.mul_(1 + 0.2 * torch.rand(value.shape, generator=generator))
        elif key.endswith(("bn.bias", "bn.running_mean", "fc.bias")):
            value.add_(0.1 * torch.randn(value.shape, generator=generator))
    path = tmp_path / extractors.FID_WEIGHTS_FILE
    torch.save(state, path)
    monkeypatch.setattr(extractors, "FID_WEIGHTS_SHA256_PREFIX", "")      # a seeded file cannot have the real sha256
    ours = extractors.InceptionExtractor.from_file(path, batch_size=8)
    assert ours.name == "inception" and ours.weights_checksum == file_sha256(path)

    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (FIDInceptionA(c, pool_features=p) for c, p in ((192, 32), (256, 64),
                                                                                                 (288, 64)))
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (FIDInceptionC(768, channels_7x7=c)
                                                              for c in (128, 160, 160, 192))
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    net.load_state_dict(torch.load(path, weights_only=True))
    net.eval().requires_grad_(False)
    captured = {}
    net.avgpool.register_forward_hook(lambda m, i, o: captured.update(pool=o.flatten(1)))
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(spatial=o))

    rng = np.random.default_rng(0)
    for images in (rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8),      # upsampled to 299, as ImageNet 256
                   rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)):     # already 299: no resize
        out = ours.extract(images)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float()      # NCHW memory, as ours
        if x.shape[-1] != 299:
            x = tf1_resize_bilinear(x, 299)
        with torch.no_grad():
            net((x - 128) / 128)
        pool = captured["pool"]
        np.testing.assert_allclose(out["pool"], pool.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["logits"], (pool @ net.fc.weight.T).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["spatial"], sfid_features(captured["spatial"]), rtol=1e-5, atol=1e-5)
        assert out["pool"].shape == (len(images), 2048) and out["spatial"].shape[1] == 2023


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return print, ("unpickled code ran",)


def test_inception_weights_that_are_not_only_tensors_are_refused(tmp_path, monkeypatch, capsys):
    # torch-fidelity loads the file with weights_only=False; from_file must refuse it before that can run code
    from sddit import extractors
    path = tmp_path / extractors.FID_WEIGHTS_FILE
    torch.save({"fc.weight": torch.zeros(2), "payload": _RunsCodeWhenUnpickled()}, path)
    monkeypatch.setattr(extractors, "FID_WEIGHTS_SHA256_PREFIX", "")
    with pytest.raises(extractors.ExtractorError, match="cannot load .* into the FID Inception-v3: Weights only load"):
        extractors.InceptionExtractor.from_file(path)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_missing_or_wrong_inception_weights_fail_clearly(tmp_path, monkeypatch, checkpoint, mlflow_dir):
    from sddit.extractors import FID_WEIGHTS_FILE, WEIGHTS_ENV, ExtractorError
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(ExtractorError, match=rf"no Inception weights given.*{FID_WEIGHTS_FILE}.*--inception-weights"):
        InceptionExtractor.from_file()
    with pytest.raises(ExtractorError, match=rf"nowhere\.pth' does not exist.*{FID_WEIGHTS_FILE}"):
        InceptionExtractor.from_file(tmp_path / "nowhere.pth")
    wrong = tmp_path / FID_WEIGHTS_FILE
    wrong.write_bytes(b"not the weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(wrong))
    with pytest.raises(ExtractorError, match=r"has sha256 [0-9a-f]{16}\.\.\., but .* starts with 6726825d"):
        InceptionExtractor.from_file()
    out = tmp_path / "eval"                             # the stage refuses before it samples anything
    with pytest.raises(ExtractorError, match="6726825d"):
        run_evaluate(checkpoint, out, mlflow_dir, "--extractor", "inception", "--inception-weights", str(wrong))
    assert not out.exists()


def test_random_inception_through_the_whole_stage(domain_run, checkpoint, mlflow_dir, random_inception, monkeypatch,
                                                  tmp_path):
    import pipelines.evaluate as stage
    out = tmp_path / "inception"
    shutil.copytree(domain_run[0], out)
    monkeypatch.setattr(stage, "make_extractor", lambda name, **kwargs: random_inception)
    metrics = run_evaluate(checkpoint, out, mlflow_dir, "--extractor", "inception")   # samples exist: metrics only
    suffix = "inception-random"
    assert set(metrics) == {f"{m}_{suffix}" for m in ("fid", "sfid", "is", "precision", "recall")}
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics[f"fid_{suffix}"] > 0 and metrics[f"sfid_{suffix}"] > 0 and metrics[f"is_{suffix}"] >= 1
    assert json.loads((out / "metrics.json").read_text()) == metrics


# --- end to end with the domain classifier ---------------------------------------------------------------------

def test_domain_evaluation_end_to_end(domain_run, pixel_dataset, mlflow_dir):
    out, metrics = domain_run
    assert set(metrics) == {"fid_domain", "sfid_domain", "is_domain", "precision_domain", "recall_domain",
                            "class_agreement_domain"}
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["class_agreement_domain"] <= 1 and metrics["is_domain"] >= 1
    assert json.loads((out / "metrics.json").read_text()) == metrics
    with np.load(out / "samples.npz") as samples:
        assert samples["arr_0"].dtype == np.uint8 and samples["arr_0"].shape == (12, 8, 8, 3)
        assert np.bincount(samples["arr_1"]).tolist() == [4, 4, 4]
        assert samples["arr_0"].std() > 0
    classifier = torch.load(pixel_dataset / "domain_classifier.pt", weights_only=True)
    assert 0 <= classifier["accuracy"] <= 1 and len(classifier["key"]["shard_sha256"]) >= 1
    assert (out / "samples_grid.png").is_file()

    import mlflow

    from pipelines.tracking import tracking_uri
    mlflow.set_tracking_uri(tracking_uri(mlflow_dir))
    runs = mlflow.search_runs(experiment_names=["sddit"], order_by=["attributes.start_time ASC"],
                              filter_string="tags.`sddit.stage` = 'evaluate' and params.extractor = 'domain'")
    params = runs.iloc[0]
    assert params["params.steps"] == "2" and params["params.cfg_channels"] == "all"
    assert params["params.weights"] == "generation EMA" and params["params.checkpoint_step"] == "123"
    assert params["params.extractor"] == "domain"
    assert params["metrics.fid_domain"] == pytest.approx(metrics["fid_domain"])


def test_sampling_actors_are_released_after_an_evaluation_unless_kept(checkpoint, mlflow_dir, tmp_path):
    """Kept actors hold their CPUs: a later stage in the same driver (an encode actor, a Train worker) would
    wait for them forever. An evaluation releases them; a caller that keeps them for its next evaluation
    reuses them, then releases them."""
    import ray

    from pipelines import evaluate
    cpus = ray.cluster_resources()["CPU"]
    run_evaluate(checkpoint, tmp_path / "a", mlflow_dir, "--extractor", "domain")
    assert evaluate._pool["actors"] == []
    args = evaluate.parse_args(["--checkpoint", str(checkpoint), "--run-dir", str(mlflow_dir), "--extractor",
                                "domain", *EVAL_ARGS])
    args.out = str(tmp_path / "b")
    evaluate.evaluate(args, keep_actors=True)
    kept = list(evaluate._pool["actors"])
    assert kept and ray.available_resources().get("CPU", 0) < cpus
    args.out, args.cfg_scale = str(tmp_path / "c"), 1.0
    evaluate.evaluate(args, keep_actors=True)
    assert evaluate._pool["actors"] == kept                                # the same actors drew the second one
    evaluate.release_sampling_actors()
    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < cpus and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == cpus


def test_interrupted_sampling_resumes_only_the_missing_batch(domain_run, checkpoint, mlflow_dir):
    out, metrics = domain_run
    before = (out / "samples.npz").read_bytes()
    kept = {b: batch_path(out, b).stat().st_mtime_ns for b in (0, 2)}
    batch_path(out, 1).unlink()                         # as a run killed before its second batch came back
    again = run_evaluate(checkpoint, out, mlflow_dir, "--extractor", "domain")
    assert {b: batch_path(out, b).stat().st_mtime_ns for b in (0, 2)} == kept
    assert batch_path(out, 1).is_file()
    assert (out / "samples.npz").read_bytes() == before
    assert again == metrics
    with pytest.raises(EvaluationError, match=r"num_samples: existing 12 vs requested 8"):
        run_evaluate(checkpoint, out, mlflow_dir, "--extractor", "domain", "--num-samples", "8")


# --- references --------------------------------------------------------------------------------------------------

class Counting:
    """An extractor wrapper that counts its calls."""

    def __init__(self, inner, name=None):
        self.inner, self.calls = inner, 0
        self.name, self.weights_checksum = name or inner.name, inner.weights_checksum

    def extract(self, images):
        self.calls += 1
        return self.inner.extract(images)


def test_reference_statistics_are_cached_next_to_the_shards(domain_run, pixel_dataset, tmp_path):
    dataset = tmp_path / "copy"
    shutil.copytree(pixel_dataset, dataset, ignore=shutil.ignore_patterns("reference-*"))
    extractor = Counting(make_extractor("domain", dataset_dir=dataset))
    first = reference_from_dataset(dataset, extractor)
    assert extractor.calls > 0 and len(list(dataset.glob("reference-domain-*.npz"))) == 1
    calls = extractor.calls
    second = load_reference(None, extractor, dataset_dir=dataset)
    assert extractor.calls == calls                     # served from the cache
    np.testing.assert_array_equal(first.sigma, second.sigma)
    np.testing.assert_array_equal(first.features, second.features)
    unflipped = 23                                      # good images in the image_tree fixture
    assert first.features.shape == (unflipped, 128)

    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64          # another dataset: the cache must not be used
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    reference_from_dataset(dataset, extractor)
    assert extractor.calls > calls


def test_adm_reference_npz(domain_run, pixel_dataset, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=images, mu=np.full(128, 7.0), sigma=np.eye(128), mu_s=np.zeros(3), sigma_s=np.eye(3))
    domain = make_extractor("domain", dataset_dir=pixel_dataset)
    # any extractor but the real Inception takes everything from arr_0, through itself
    own = reference_from_npz(path, Counting(domain))
    outputs = domain.extract(images)
    np.testing.assert_allclose(own.mu, outputs["pool"].mean(0), rtol=1e-5, atol=1e-6)
    assert own.features.shape == (10, 128)
    np.testing.assert_allclose(own.mu_s, outputs["spatial"].mean(0), rtol=1e-5, atol=1e-6)   # the domain sFID layer
    # the real Inception uses the file's TF statistics, and arr_0 only for precision/recall
    as_inception = Counting(domain, name="inception")
    adm = reference_from_npz(path, as_inception)
    assert (adm.mu == 7.0).all() and adm.sigma_s.shape == (3, 3) and adm.features.shape == (10, 128)
    assert len(list(tmp_path.glob("VIRTUAL_tiny.*.features.npz"))) == 2
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(4))
    with pytest.raises(EvaluationError, match=r"stats_only.npz has no arr_0 images"):
        reference_from_npz(tmp_path / "stats_only.npz", domain)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not ours"])
def test_a_bad_checkpoint_is_one_line_naming_the_file(checkpoint, pixel_dataset, tmp_path, damage, capsys):
    """evaluate --checkpoint and train --init-from with a damaged file: exit status 1, one line, no traceback.
    Every kind of damage through the commands' own error handling (run_cli, in this process: both fail before
    Ray starts); one of them also as a user runs it, in a process of its own, to see the real console."""
    import subprocess
    import sys

    import torch
    from pipelines import evaluate, train
    from pipelines.common import run_cli
    from sddit.checkpoint import CheckpointError, load_checkpoint
    bad = tmp_path / "checkpoint.pt"
    good = Path(checkpoint).read_bytes()
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 3])
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a checkpoint" * 100)
    else:
        torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match=str(bad)):
        load_checkpoint(bad)
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(TINY))
    commands = {"evaluate": (evaluate, ["--checkpoint", str(bad)]),
                "train": (train, ["--data", str(pixel_dataset), "--preset", str(tmp_path / "p.yaml"),
                                  "--num-workers", "1", "--init-from", str(bad)])}
    for stage, (module, argv) in commands.items():
        with pytest.raises(SystemExit) as exit_:
            run_cli(stage, lambda: module.main(argv))
        assert str(exit_.value.code).startswith(f"{stage}: ") and str(bad) in str(exit_.value.code)
        assert "\n" not in str(exit_.value.code)
        if damage == "truncated":
            done = subprocess.run([sys.executable, str(root / "pipelines" / f"{stage}.py"), *argv],
                                  capture_output=True, text=True, timeout=300, cwd=tmp_path)
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert done.stderr.strip().startswith(f"{stage}: ") and str(bad) in done.stderr


def test_domain_sfid_features_are_the_second_stage_channels_in_hwc_order(pixel_dataset):
    domain = make_extractor("domain", dataset_dir=pixel_dataset)
    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    spatial = domain.extract(images)["spatial"]
    net = domain.net
    with torch.no_grad():
        low = net.low(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)   # [3, 2w, 4, 4]
    channels = net.SFID_CHANNELS
    assert spatial.shape == (3, 4 * 4 * channels)
    # column (h * 4 + w) * channels + c holds channel c at (h, w), as ADM lays out Inception's mixed_6/conv
    np.testing.assert_allclose(spatial[:, (1 * 4 + 2) * channels + 3], low[:, 3, 1, 2].numpy(), rtol=1e-5, atol=1e-6)


# --- the judge is a function of the image set alone -------------------------------------------------------------

def test_a_domain_judge_trained_on_the_same_rows_in_another_order_is_the_same_network():
    from sddit.extractors import DomainExtractor
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    images[..., 0] = (labels * 100)[:, None, None].astype(np.uint8)     # learnable classes
    groups = np.array([f"img{i // 2}" for i in range(60)])             # pairs, as an image and its flip
    first = DomainExtractor.fit(images, labels, groups, num_classes=3)
    order = rng.permutation(60)
    second = DomainExtractor.fit(images[order], labels[order], groups[order], num_classes=3)
    assert second.weights_checksum == first.weights_checksum and second.accuracy == first.accuracy
    other = DomainExtractor.fit(images[1:], labels[1:], groups[1:], num_classes=3)
    assert other.weights_checksum != first.weights_checksum           # the checksum does tell image sets apart


def test_two_encodings_of_the_same_images_give_the_same_judge_and_reference(image_tree, tmp_path):
    from tests.fixtures import encode_pixels
    first = encode_pixels(image_tree[0], tmp_path / "first", 8, "--rows-per-shard", "7")
    second = tmp_path / "second"                            # the same shards, listed in the reverse order
    shutil.copytree(first, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["shards"].reverse()
    (second / "manifest.json").write_text(json.dumps(manifest))
    datasets = [first, second]
    orders = [np.concatenate([read_shard(d / s["file"], ["image_id"]).column("image_id").to_numpy(zero_copy_only=False)
                              for s in Manifest.read(d).shards]) for d in datasets]
    assert sorted(orders[0]) == sorted(orders[1]) and list(orders[0]) != list(orders[1])
    judges = [make_extractor("domain", dataset_dir=d) for d in datasets]
    assert judges[0].weights_checksum == judges[1].weights_checksum
    references = [reference_from_dataset(d, judge, pr_size=10) for d, judge in zip(datasets, judges)]
    np.testing.assert_allclose(references[0].mu, references[1].mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.sort(references[0].features, axis=0), np.sort(references[1].features, axis=0),
                               rtol=1e-5, atol=1e-5)
