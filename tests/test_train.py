"""The train stage: bare-loop exact resume and NaN handling, then Ray Train with 2 CPU workers."""
import copy

import pytest
import torch
import yaml

from sddit.checkpoint import load_checkpoint
from sddit.config import apply_overrides, load_preset
from sddit.data import DataError
from sddit.errors import ConfigError
from sddit.training import LocalHooks, NonFiniteError, train_loop
from tests.fixtures import TINY, encode_pixels


@pytest.fixture(scope="module")
def dataset(ray_session, image_tree, tmp_path_factory):
    return encode_pixels(image_tree[0], tmp_path_factory.mktemp("train-data") / "pixel8", 8)


@pytest.fixture
def preset(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class CrashAt(LocalHooks):
    """Simulates a process killed right after step `at` (after any checkpoint of that step)."""

    def __init__(self, run_dir, at):
        super().__init__(run_dir, verbose=False)
        self.at = at

    def log(self, step, metrics, checkpoint_follows=False):
        if step >= self.at:
            raise KeyboardInterrupt(f"killed at step {step}")


def resumes_bitwise_exactly(config, dataset, tmp_path, crash_at: int, init_from=None) -> dict:
    """Train straight through; train again, killed after step `crash_at`, and resume from the last checkpoint:
    the two end states are bitwise equal. Returns the final checkpoint."""
    straight = LocalHooks(tmp_path / "straight", verbose=False)
    train_loop(copy.deepcopy(config), dataset, hooks=straight, init_from=init_from)
    reference = load_checkpoint(straight.latest())
    assert reference["step"] == config.train.steps

    crashed = CrashAt(tmp_path / "crashed", at=crash_at)
    with pytest.raises(KeyboardInterrupt):
        train_loop(copy.deepcopy(config), dataset, hooks=crashed, init_from=init_from)
    partial = load_checkpoint(crashed.latest())
    every = config.train.checkpoint_every
    assert partial["step"] == crash_at // every * every
    resumed = LocalHooks(tmp_path / "crashed", verbose=False)
    train_loop(copy.deepcopy(config), dataset, hooks=resumed, resume=partial)
    final = load_checkpoint(resumed.latest())
    assert final["step"] == config.train.steps
    assert state_equal(final["model"], reference["model"])                 # student, teacher, centres
    assert state_equal(final["generation_ema"], reference["generation_ema"])
    assert final["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for key, slots in reference["optimizer"]["state"].items():
        assert all(torch.equal(v, final["optimizer"]["state"][key][name]) for name, v in slots.items())
    assert final["config"] == reference["config"]
    return final


def test_bare_loop_resumes_bitwise_exactly(dataset, preset, tmp_path):
    # checkpoint at 3, killed at 4: the data position resumes mid-epoch
    final = resumes_bitwise_exactly(load_preset(preset), dataset, tmp_path, crash_at=4)
    assert final["data_position"]["epoch"] >= 0


def test_resume_mid_warm_up_is_bitwise_exact_and_the_logged_lr_follows_the_warm_up(dataset, preset, tmp_path):
    # warm-up over 6 of the 8 steps, checkpoint at 3, killed at 4: the run resumes half-way up the ramp
    config = apply_overrides(load_preset(preset), ["optim.warmup_steps=6", "disc.teacher_label=false"])
    final = resumes_bitwise_exactly(config, dataset, tmp_path, crash_at=4)
    assert final["config"].optim.warmup_steps == 6 and final["config"].disc.teacher_label is False
    hooks = RecordMetrics(tmp_path / "logged")
    train_loop(copy.deepcopy(config), dataset, hooks=hooks)
    lr = config.optim.lr
    assert {step: m["lr"] for step, m in hooks.metrics.items()} == pytest.approx(
        {2: lr * 2 / 6, 4: lr * 4 / 6, 6: lr, 8: lr})


def test_mdt_resumes_bitwise_exactly_and_logs_both_passes(dataset, preset, tmp_path):
    """MDT's per-step mask ratio is drawn from the step's generator, so a resumed run draws the same ones."""
    from sddit.models.registry import family_overrides
    config = apply_overrides(load_preset(preset), ["model.name=MDT-S/2", *family_overrides("MDT")])
    final = resumes_bitwise_exactly(config, dataset, tmp_path, crash_at=4)
    assert any(key.startswith("denoiser.net.decoder.side_interpolater.") for key in final["model"])
    hooks = RecordMetrics(tmp_path / "logged")
    train_loop(copy.deepcopy(config), dataset, hooks=hooks)
    assert all(m["loss_unmasked"] > 0 and m["loss_masked_patches"] > 0 for m in hooks.metrics.values())


def test_self_supervised_runs_resume_bitwise_exactly_and_log_their_terms(dataset, preset, tmp_path):
    """LayerSync, Dispersive Loss and SRA together (SRA's head is in the checkpoint; its teacher is the generation
    EMA, which is too)."""
    config = apply_overrides(load_preset(preset), ["model.layersync_weight=0.2", "model.dispersive_weight=0.25",
                                                   "model.sra_weight=0.2"])
    final = resumes_bitwise_exactly(config, dataset, tmp_path, crash_at=4)
    assert (final["config"].model.layersync_weight, final["config"].model.sra_weight) == (0.2, 0.2)
    assert any(key.startswith("sra_head.") for key in final["model"])
    hooks = RecordMetrics(tmp_path / "logged")
    train_loop(copy.deepcopy(config), dataset, hooks=hooks)
    assert all(-1 <= m["loss_layersync"] <= 1 and m["loss_dispersive"] <= 0 and m["loss_sra"] >= 0
               and -1 <= m["sra_cosine"] <= 1 for m in hooks.metrics.values())


def test_a_checkpoint_from_before_cls_gate_loads_with_the_gate_it_was_trained_with(dataset, preset, tmp_path):
    hooks = LocalHooks(tmp_path, verbose=False)
    train_loop(load_preset(preset), dataset, hooks=hooks)
    path = hooks.latest() / "checkpoint.pt"
    payload = torch.load(path, weights_only=False)
    assert payload["config"]["model"]["cls_gate"] == "open"
    del payload["config"]["model"]["cls_gate"]
    torch.save(payload, path)
    assert load_checkpoint(path)["config"].model.cls_gate == "zero"


def test_residual_probe_trains_an_arm_and_records_the_stream_at_every_point(dataset, preset, tmp_path, capsys):
    import json

    from bench.residual_probe import main as residual_probe
    out = tmp_path / "probe.jsonl"
    residual_probe(["--arm", "DiT-Dispersive", "--preset", str(preset), "--data", str(dataset), "--steps", "4",
                    "--every", "2", "--probe-images", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    points = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 2, 4] and "step 4: token rms" in printed
    assert all(p["label"] == "DiT-Dispersive" and len(p["token_rms"]) == 2 for p in points)
    # adaLN-Zero: every block is the identity at init, so the stream leaves each block as it entered
    assert points[0]["token_rms"][0] == points[0]["token_rms"][1] > 0
    assert points[0]["pair_distance_per_dim"] > 0 and points[0]["denoise_error_sigma1"] > 0
    assert "batch_loss_dispersive" in points[1] and points[1]["batch_loss_dispersive"] <= 0
    residual_probe(["--table", str(out)])
    assert f"| DiT-Dispersive | 0 | {points[0]['token_rms'][-1]:.1f} |" in capsys.readouterr().out


@pytest.mark.parametrize("cls_gate", ["open", "zero"])
def test_cls_probe_trains_and_records_the_teachers_cls_at_every_point(dataset, preset, tmp_path, cls_gate, capsys):
    import json

    from bench.cls_probe import main as cls_probe
    out = tmp_path / "probe.jsonl"
    cls_probe(["--preset", str(preset), "--data", str(dataset), "--steps", "4", "--every", "2", "--probe-images", "8",
               "--label", cls_gate, "--set", f"model.cls_gate={cls_gate}", "--out", str(out)])
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    points, summary = records[:-1], records[-1]
    assert [p["step"] for p in points] == [0, 2, 4] and summary["kind"] == "summary"
    assert all(p["label"] == cls_gate and p["denoise_error"] > 0 for p in points)
    assert "batch_loss_cls" in points[1] and "step 4: CLS logit std" in printed
    cls_probe(["--table", str(out)])
    table = capsys.readouterr().out
    assert f"| {cls_gate} | {points[0]['cls_logit_std']:.4f} |" in table and summary["verdict"] in table
    if cls_gate == "zero":                                  # the same CLS for every image at init
        assert points[0]["cls_token_std"] == 0 and summary["verdict"] == "constant at init"
    else:
        assert points[0]["cls_token_std"] > 0 and summary["cls_logit_std_first"] > 0
        assert summary["verdict"] in ("amplified", "held", "erased")


class RecordReports(LocalHooks):
    def __init__(self, run_dir):
        super().__init__(run_dir, verbose=False)
        self.logged, self.checkpointed, self.finished_with = [], [], []

    def log(self, step, metrics, checkpoint_follows=False):
        self.logged.append(step)

    def checkpoint(self, step, save, metrics):
        super().checkpoint(step, save, metrics)
        self.checkpointed.append((step, metrics))

    def finished(self, step, metrics):
        self.finished_with.append((step, metrics))


def test_a_finished_run_resumed_from_its_final_checkpoint_reports_its_final_metrics_again(dataset, preset, tmp_path):
    """A sweep killed between a trial's final checkpoint and Tune's record of it reruns the trial from that
    checkpoint: with no step left to run, the run must still report the metrics the sweep ranks by, and must
    not write a new checkpoint (a pipeline's evaluation of the old one would no longer count)."""
    config = load_preset(preset)
    first = RecordReports(tmp_path)
    train_loop(copy.deepcopy(config), dataset, hooks=first)
    final_step, final_metrics = first.checkpointed[-1]
    assert final_step == config.train.steps and "loss" in final_metrics and first.finished_with == []
    final = first.latest()
    written = (final / "checkpoint.pt").stat().st_mtime_ns

    again = RecordReports(tmp_path)
    returned = train_loop(copy.deepcopy(config), dataset, hooks=again, resume=load_checkpoint(final))
    assert again.logged == [] and again.checkpointed == []          # no step trained, nothing saved
    assert again.finished_with == [(config.train.steps, final_metrics)] and returned == final_metrics
    assert again.latest() == final and (final / "checkpoint.pt").stat().st_mtime_ns == written


class RecordMetrics(LocalHooks):
    def __init__(self, run_dir):
        super().__init__(run_dir, verbose=False)
        self.metrics = {}

    def log(self, step, metrics, checkpoint_follows=False):
        self.metrics[step] = metrics


class RecordSamples(LocalHooks):
    def __init__(self, run_dir):
        super().__init__(run_dir, verbose=False)
        self.grids = {}

    def samples(self, step, latents):
        self.grids[step] = latents.shape


@pytest.mark.parametrize("count", [0, 3])
def test_sample_grids_have_the_configured_size_or_are_off(dataset, preset, tmp_path, count):
    config = apply_overrides(load_preset(preset), [f"train.sample_count={count}", "train.sample_every=4"])
    hooks = RecordSamples(tmp_path)
    train_loop(config, dataset, hooks=hooks)
    side, channels = config.model.input_size, config.model.in_channels
    assert hooks.grids == ({} if count == 0 else {4: (3, channels, side, side), config.train.steps: (3, channels, side, side)})


class FakeClock:
    """time.perf_counter for the loop: 1 ms per reading, plus whatever the hooks spend (never real time), so the
    accounting is checked exactly, whatever else the machine is doing."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class SlowHooks(RecordMetrics):
    """Each log, sample grid and checkpoint takes 0.25 s longer on the clock, as an MLflow call or an upload can."""

    def __init__(self, run_dir, clock: FakeClock):
        super().__init__(run_dir)
        self.clock, self.slept = clock, 0.0

    def pause(self):
        self.clock.now += 0.25
        self.slept += 0.25

    def log(self, step, metrics, checkpoint_follows=False):
        super().log(step, metrics, checkpoint_follows)
        self.pause()

    def samples(self, step, latents):
        self.pause()

    def checkpoint(self, step, save, metrics):
        super().checkpoint(step, save, metrics)
        self.pause()


def test_training_time_leaves_out_logging_sample_grids_and_checkpoints(dataset, preset, tmp_path, monkeypatch):
    import sddit.training
    clock = FakeClock()
    monkeypatch.setattr(sddit.training.time, "perf_counter", clock)
    hooks = SlowHooks(tmp_path, clock)
    start = clock()
    train_loop(load_preset(preset), dataset, hooks=hooks)
    wall = clock() - start
    assert hooks.slept == 0.25 * (4 + 2 + 3)                # logs at 2, 4, 6, 8; grids at 4, 8; checkpoints at 3, 6, 8
    assert 0 < hooks.metrics[8]["step_seconds"] < wall - hooks.slept
    batch = load_preset(preset).optim.batch_size
    for step in (4, 6, 8):                                  # a window's rate: its steps over its own step time
        window = hooks.metrics[step]["step_seconds"] - hooks.metrics[step - 2]["step_seconds"]
        assert hooks.metrics[step]["images_per_s"] == pytest.approx(2 * batch / window)
        assert 0 < window < 0.25                            # no pause of the steps before it


@pytest.mark.parametrize("crash_at", [4, 7])                    # resumed in the masked phase, then the unmasked one
def test_masked_pretraining_then_unmasked_finetuning_resumes_exactly_in_either_phase(dataset, preset, tmp_path,
                                                                                      crash_at):
    config = apply_overrides(load_preset(preset), ["model.mask_ratio=0.5", "train.unmasked_fraction=0.375"])
    resumes_bitwise_exactly(config, dataset, tmp_path, crash_at=crash_at)
    hooks = RecordMetrics(tmp_path / "logged")
    train_loop(copy.deepcopy(config), dataset, hooks=hooks)
    assert {step: m["mask_ratio"] for step, m in hooks.metrics.items()} == {2: 0.5, 4: 0.5, 6: 0.0, 8: 0.0}


@pytest.fixture(scope="module")
def dataset16(ray_session, image_tree, tmp_path_factory):
    return encode_pixels(image_tree[0], tmp_path_factory.mktemp("train-data") / "pixel16", 16)


def test_a_low_resolution_checkpoint_initialises_a_high_resolution_run_that_resumes_exactly(
        dataset, dataset16, preset, tmp_path):
    low = LocalHooks(tmp_path / "low", verbose=False)
    train_loop(load_preset(preset), dataset, hooks=low)
    source = load_checkpoint(low.latest())
    config = apply_overrides(load_preset(preset), ["data.resolution=16", "diffusion.sigma_scale=2"])
    final = resumes_bitwise_exactly(config, dataset16, tmp_path, crash_at=4, init_from=source)
    assert final["config"].model.input_size == 16 and final["config"].model.pos_embed_grid == 4
    assert final["model"]["denoiser.net.encoder.pos_embed"].shape[1] == 64       # an 8x8 grid over the 4x4 span


def test_nan_steps_are_skipped_then_the_run_stops_keeping_the_last_good_checkpoint(dataset, preset, tmp_path,
                                                                                    monkeypatch):
    from sddit.loader import LatentLoader
    clean_batch = LatentLoader.batch

    def poisoned(self, step):
        batch = clean_batch(self, step)
        return batch._replace(x0=batch.x0 * float("nan")) if step >= 4 else batch

    monkeypatch.setattr(LatentLoader, "batch", poisoned)
    hooks = LocalHooks(tmp_path, verbose=False)
    logged = []
    hooks.log = lambda step, metrics, checkpoint_follows=False: logged.append((step, metrics["skipped_steps"]))
    with pytest.raises(NonFiniteError, match="4 consecutive steps .* before step 8"):
        train_loop(load_preset(preset), dataset, hooks=hooks)
    last = load_checkpoint(hooks.latest())
    assert last["step"] == 6 and logged[-1] == (6, 2.0)     # steps 5-6 skipped by the log at 6; 5-8 stop it at 8
    good = load_checkpoint(sorted((tmp_path / "checkpoints").glob("step-*"))[0])
    assert good["step"] == 3
    # the skipped steps changed nothing: the checkpoint at 6 holds the state after step 4
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_mismatched_or_missing_shards_are_refused(dataset, preset, tmp_path):
    from pipelines.train import main
    bad = yaml.safe_load(preset.read_text())
    bad["data"]["resolution"] = 16
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(bad))
    with pytest.raises(DataError, match=r"manifest.json: dataset resolution 8 but the config expects data.resolution=16"):
        main(["--data", str(dataset), "--preset", str(other), "--run-dir", str(tmp_path)])
    bad["data"] = {"codec": "sd-vae", "resolution": 8}
    other.write_text(yaml.safe_dump(bad))
    with pytest.raises(DataError, match=r"dataset codec 'pixel' but the config expects data.codec='sd-vae'"):
        main(["--data", str(dataset), "--preset", str(other), "--run-dir", str(tmp_path)])
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dataset.iterdir():
        if f.name != "part-00001.parquet":
            (broken / f.name).symlink_to(f)
    with pytest.raises(DataError, match=r"part-00001.parquet: shard listed in the manifest is missing"):
        main(["--data", str(broken), "--preset", str(preset), "--run-dir", str(tmp_path)])


def test_model_flag_gives_the_registry_architecture_and_set_still_wins(dataset):
    """--model used to rename the preset's model and keep its architecture: 'DiT-S/2' trained the demo's SD-DiT."""
    from pipelines.train import parse_args, resolve_config

    def resolved(*extra):
        return resolve_config(parse_args(["--data", str(dataset), "--preset", "demo", *extra])).model

    dit = resolved("--model", "DiT-S/2")
    assert (dit.name, dit.depth, dit.hidden_size, dit.num_heads) == ("DiT-S/2", 12, 384, 6)
    assert (dit.mask_ratio, dit.decoder_depth, dit.cls_token, dit.disc_weight) == (0.0, 0, False, 0.0)
    assert (dit.input_size, dit.in_channels, dit.num_classes, dit.head_out_size) == (8, 3, 3, 512)  # the preset's
    maskdit = resolved("--model", "MaskDiT-B/4", "--set", "model.mask_ratio=0.3")
    assert (maskdit.hidden_size, maskdit.patch_size, maskdit.decoder_depth, maskdit.mae_weight) == (768, 4, 8, 0.1)
    assert maskdit.mask_ratio == 0.3                                    # --set applies after --model
    with pytest.raises(ConfigError, match=r"^model.name: unknown model 'DiT-XXL/2'; expected one of DiT-S/2"):
        resolved("--model", "DiT-XXL/2")
    demo = resolved()
    assert (demo.name, demo.hidden_size, demo.depth) == ("SD-DiT-S/2", 128, 4)  # no --model: the preset's own


def test_a_truncated_shard_or_a_manifest_that_does_not_parse_is_one_line(dataset, preset, tmp_path):
    """Both are found before Ray starts, so the command's own error handling (run_cli) runs in this process;
    test_evaluate's bad-checkpoint test watches train's real console print such a line."""
    import shutil

    from pipelines.common import run_cli
    from pipelines.train import main as train_main
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = broken / "part-00001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    argv = ["--data", str(broken), "--preset", str(preset), "--run-dir", str(tmp_path / "runs")]

    def one_line():
        with pytest.raises(SystemExit) as exit_:
            run_cli("train", lambda: train_main(argv))
        assert "\n" not in str(exit_.value.code)
        return str(exit_.value.code)

    assert one_line().startswith(f"train: {shard}: unreadable shard, truncated or not Parquet")
    (broken / "manifest.json").write_text('{"settings": ')
    assert one_line().startswith(f"train: {broken / 'manifest.json'}: not a valid sddit manifest")


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_to_resume_from(dataset, preset, tmp_path, monkeypatch):
    import errno

    from sddit import checkpoint
    from sddit.errors import StorageError
    config = apply_overrides(load_preset(preset), ["train.steps=6", "train.checkpoint_every=2"])
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(payload, f):
        calls.append(payload["step"])
        if payload["step"] == 4:
            f.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(payload, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    hooks = LocalHooks(tmp_path, verbose=False)
    with pytest.raises(StorageError, match=r"step-00000004/checkpoint.pt: could not write it \(No space left"):
        train_loop(config, dataset, hooks=hooks)
    monkeypatch.undo()
    assert calls == [2, 4] and hooks.latest().name == "step-00000002"
    train_loop(config, dataset, hooks=hooks, resume=load_checkpoint(hooks.latest()))
    assert load_checkpoint(hooks.latest())["step"] == 6


@pytest.fixture(scope="module")
def ray_runs(dataset, tmp_path_factory):
    """The same 2-worker training twice: once straight, once with rank 1 killed at step 5."""
    import os

    from pipelines.train import KILL_ENV, main
    root = tmp_path_factory.mktemp("ray-train")
    preset = root / "tiny.yaml"
    preset.write_text(yaml.safe_dump(TINY))
    common = ["--data", str(dataset), "--preset", str(preset), "--num-workers", "2", "--run-dir", str(root / "runs")]
    straight = main(common + ["--name", "straight"])
    os.environ[KILL_ENV] = f"1:5:{root / 'killed.marker'}"
    try:
        killed = main(common + ["--name", "killed", "--max-failures", "2"])
    finally:
        del os.environ[KILL_ENV]
    return root, straight, killed


def test_ray_train_two_workers_survives_a_killed_worker_bitwise(ray_runs):
    root, straight, killed = ray_runs
    assert (root / "killed.marker").exists()                # the worker really died once
    a, b = load_checkpoint(straight["checkpoint"]), load_checkpoint(killed["checkpoint"])
    assert a["step"] == b["step"] == 8
    assert state_equal(a["model"], b["model"]) and state_equal(a["generation_ema"], b["generation_ema"])
    assert a["dataset"]["codec"] == "pixel" and a["dataset"]["num_classes"] == 3


def test_mlflow_has_one_run_per_training_with_continuous_metrics_and_images(ray_runs):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import tracking_uri
    root, straight, killed = ray_runs
    client = MlflowClient(tracking_uri(root / "runs"))
    experiment = client.get_experiment_by_name("sddit")
    train_runs = client.search_runs([experiment.experiment_id], "tags.`sddit.stage` = 'train'")
    assert sorted(r.data.tags["sddit.train_name"] for r in train_runs) == ["killed", "straight"]
    for result in (straight, killed):
        steps = [m.step for m in client.get_metric_history(result["mlflow_run_id"], "loss")]
        assert steps == sorted(set(steps)) and steps[0] == 2 and steps[-1] == 8   # continues, no duplicates
        images = client.list_artifacts(result["mlflow_run_id"], "images")
        assert images, "sample grids logged as MLflow images"
        run = client.get_run(result["mlflow_run_id"])
        assert run.data.params["model.name"] == "SD-DiT-S/2" and run.data.tags["sddit.final_checkpoint"]


def test_a_training_run_records_the_code_of_every_start(tmp_path, monkeypatch):
    """Which code produced a run's curves: the version at its start, and each other version that resumed it.
    Each start finds the same run (RUNNING again, its parameters logged once); a new name is a new child run."""
    from mlflow.tracking import MlflowClient

    import sddit
    from pipelines.tracking import tracking_uri, use_store
    from pipelines.train import CODE_VERSION_TAG, find_or_create_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(tmp_path))    # restored afterwards: mlflow exports it
    experiment_id = use_store(tracking_uri(tmp_path)).experiment_id
    client = MlflowClient(tracking_uri(tmp_path))
    parent = client.create_run(experiment_id).info.run_id
    params = {f"field_{i}": i for i in range(150)}                         # more than one batch of params
    run_ids = []
    for version in ("0.1+gaaaaaaa", "0.1+gaaaaaaa", "0.1+gbbbbbbb"):
        monkeypatch.setattr(sddit, "code_version", lambda version=version: version)
        run_ids.append(find_or_create_run(client, experiment_id, "probe", params, parent_run_id=parent))
        client.set_terminated(run_ids[-1])
    assert len(set(run_ids)) == 1
    run = client.get_run(run_ids[0])
    assert run.data.tags[CODE_VERSION_TAG] == "0.1+gaaaaaaa, 0.1+gbbbbbbb"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["sddit.stage"] == "train"
    assert run.info.run_name == "train probe" and run.data.params == {key: str(v) for key, v in params.items()}
    find_or_create_run(client, experiment_id, "probe", params)
    assert client.get_run(run_ids[0]).info.status == "RUNNING"
    other = find_or_create_run(client, experiment_id, "other", {"optim.lr": 1e-3})
    assert other != run_ids[0] and "mlflow.parentRunId" not in client.get_run(other).data.tags


def test_demo_curve_bench_scores_the_untrained_model_then_every_interval(dataset, preset, tmp_path):
    import json

    from bench.demo_curve import main as demo_curve
    out = tmp_path / "curve.jsonl"
    demo_curve(["--data", str(dataset), "--preset", str(preset), "--steps", "4", "--every", "2", "--samples", "20",
                "--heun-steps", "2", "--threads", "1", "--out", str(out)])
    points = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["step"] for p in points] == [0, 2, 4]
    for point in points:
        assert point["fid_cfg1"] > 0 and 0 <= point["class_agreement_cfg"] <= 1
    assert all(p["images_per_s"] > 0 for p in points[1:]) and "images_per_s" not in points[0]


def test_cross_judge_bench_scores_one_draw_of_samples_under_each_judge(dataset, preset, tmp_path):
    import json

    from bench.cross_judge import main as cross_judge
    hooks = LocalHooks(tmp_path / "run", verbose=False)
    train_loop(load_preset(preset), dataset, hooks=hooks)
    out = tmp_path / "judges.jsonl"
    [record] = cross_judge(["--judge", f"a={dataset}", "--judge", f"b={dataset}", "--checkpoint",
                            f"tiny={hooks.latest()}", "--samples", "20", "--heun-steps", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == record and record["step"] == TINY["train"]["steps"]
    # one draw of samples: the same judge twice gives the same FID, and the record says which network judged
    assert record["fid[a]"] == record["fid[b]"] > 0
    assert record["judge[a]"]["sha256"] == record["judge[b]"]["sha256"] and len(record["judge[a]"]["sha256"]) == 64


@pytest.mark.parametrize("local", [True, False])
def test_a_training_run_starts_no_dataset_manager_and_locally_no_placement_group_cleaner(monkeypatch, local):
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipelines.common import LOCAL_RUNTIME_ENV, torch_trainer
    if local:
        monkeypatch.setenv(LOCAL_RUNTIME_ENV, "1")
    else:
        monkeypatch.delenv(LOCAL_RUNTIME_ENV, raising=False)
    trainer = torch_trainer(lambda config: None, scaling_config=ScalingConfig(num_workers=1))
    kinds = {type(callback) for callback in trainer._create_default_callbacks()}
    assert DatasetsCallback not in kinds                    # our workers read their shards themselves
    assert (PlacementGroupCleanerCallback in kinds) == (not local)
    assert BackendSetupCallback in kinds                    # the rest of Ray Train's set-up is kept


@pytest.mark.parametrize("stage, required, flag, bad, minimum", [
    ("encode", ["--data", "d", "--out", "o"], "--rows-per-shard", 1, 2),
    ("encode", ["--data", "d", "--out", "o"], "--limit-per-class", 0, 1),
    ("evaluate", ["--checkpoint", "c"], "--num-samples", 1, 2),
    ("evaluate", ["--checkpoint", "c"], "--cfg-scale", -0.5, 0),
    ("train", ["--data", "d"], "--cpus-per-worker", 0, 1),
    ("train", ["--data", "d"], "--max-failures", -1, 0),
])
def test_a_stage_refuses_a_value_below_its_minimum_naming_the_flag(stage, required, flag, bad, minimum, capsys):
    import importlib
    parse_args = importlib.import_module(f"pipelines.{stage}").parse_args
    parse_args(required)                                           # unset optional minimums (None) are not checked
    parse_args(required + [flag, str(minimum)])
    with pytest.raises(SystemExit) as exit_:
        parse_args(required + [flag, str(bad)])
    assert exit_.value.code == 2 and f"{flag}: must be >= {minimum}, got {bad}" in capsys.readouterr().err


def test_the_progress_line_tells_the_steps_left_at_the_last_rate():
    from pipelines.train import progress_line
    metrics = {"images_per_s": 21.3, "loss": 0.14651, "proxy_fid_domain": 63.504, "lr": 2e-3}
    line = progress_line("run", 750, 1000, 64, metrics)
    # 250 steps of 64 images at 21.3 img/s: 751 s
    assert line == "run: step 750/1000, 21 img/s, loss 0.1465, fid_domain 63.5, ~13 min of steps left"
    assert progress_line("run", 995, 1000, 64, metrics).endswith(", under a minute of steps left")
    assert progress_line("run", 1000, 1000, 64, metrics).endswith("fid_domain 63.5")     # done: nothing left to tell
    assert progress_line("run", 5, 10, 8, {"images_per_s": 0.4, "loss": 1.0}) == \
        "run: step 5/10, 0.4 img/s, loss 1, ~2 min of steps left"      # 5 steps of 8 at 0.4 img/s: 100 s
