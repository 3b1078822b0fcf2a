"""REPA: the external encoders, their features in the shards, the refusals, and training with the term."""
import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sddit.data import DataError, EncodeSettings, Manifest
from sddit.representations import (LOCAL_VIT, ExternalEncoderError, load_external_encoder, save_local_vit,
                                   train_local_vit)
from tests.fixtures import TINY, encode_pixels
from tests.test_train import CrashAt, state_equal

ROOT = Path(__file__).resolve().parents[1]
REPA_TINY = copy.deepcopy(TINY)
REPA_TINY["model"].update(repa_weight=0.5, repa_depth=1, repa_projector_size=16, repa_encoder=LOCAL_VIT)


def manifest(features=None) -> Manifest:
    settings = EncodeSettings(source="x", codec="pixel", vae=None, resolution=8, flip=True, limit_per_class=None,
                              rows_per_shard=16)
    return Manifest(settings=settings, column="pixels", scaling_factor=1.0, latent_shape=[3, 8, 8],
                    stored_shape=[8, 8, 3], num_rows=32, shards=[], classes=[{"index": i} for i in range(3)],
                    skipped=[], features=features)


# --- without Ray ---------------------------------------------------------------------------------------------

def test_a_repa_config_is_refused_on_a_dataset_without_its_features_and_takes_their_width():
    from sddit.config import config_from_dict
    from sddit.training import fit_to_dataset
    config = config_from_dict(copy.deepcopy(REPA_TINY))
    with pytest.raises(DataError, match=r"repa_weight > 0 but the dataset has no external features; encode it with "
                                        r"pipelines/encode.py --repa-encoder local-vit"):
        fit_to_dataset(copy.deepcopy(config), manifest(), "data")
    other = {"column": "repa_features", "encoder": "timm:vit_base_patch14_dinov2", "weights_sha256": "0", "shape": [16, 24]}
    with pytest.raises(DataError, match="features come from 'timm:vit_base_patch14_dinov2' but the config aligns "
                                        "with model.repa_encoder='local-vit'"):
        fit_to_dataset(copy.deepcopy(config), manifest(other), "data")
    fitted = fit_to_dataset(copy.deepcopy(config), manifest({**other, "encoder": LOCAL_VIT}), "data")
    assert fitted.model.repa_feature_dim == 24
    plain = config_from_dict(copy.deepcopy(TINY))           # without REPA the features are not needed
    assert fit_to_dataset(plain, manifest(), "data").model.repa_weight == 0


def test_a_missing_or_wrong_encoder_file_is_named_with_where_to_get_it(tmp_path):
    with pytest.raises(ExternalEncoderError, match=r"nowhere.safetensors do not exist; .*timm/vit_base_patch14_dinov2"):
        load_external_encoder("timm:vit_base_patch14_dinov2", tmp_path / "nowhere.safetensors", resolution=256)
    with pytest.raises(ExternalEncoderError, match=r"needs its weights file \(--repa-encoder-weights\)"):
        load_external_encoder(LOCAL_VIT, None, resolution=16)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not torch")
    with pytest.raises(ExternalEncoderError, match=r"garbage.pt: not a local-vit weights file"):
        load_external_encoder(LOCAL_VIT, garbage, resolution=16)
    with pytest.raises(ExternalEncoderError, match="unknown REPA encoder 'clip'"):
        load_external_encoder("clip", garbage, resolution=16)


def test_dinov2_loads_from_a_local_file_at_repa_input_size(tmp_path):
    # the real loading path (timm, pretrained from a file, position embeddings resampled from 518 to 224 px)
    # with the small DINOv2 architecture and random weights standing in for ViT-B/14's
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    save_file(timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict(), tmp_path / "w.safetensors")
    encoder = load_external_encoder("timm:vit_small_patch14_dinov2", tmp_path / "w.safetensors", resolution=32)
    assert encoder.input_size == 224 and encoder.feature_shape() == [256, 384]
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = encoder.features(images)
    assert features.dtype == np.float16 and features.shape == (2, 256, 384)
    assert not np.allclose(features, encoder.features(np.ascontiguousarray(images[:, :, ::-1])))
    grey = encoder.features(images[..., :1])                # a one-channel dataset is fed as RGB
    # float16 features: the same input through another memory layout may round to the neighbouring float16 (one
    # step is 2^-10 of the value's power-of-two range: 0.00195 at |x| = 2.21), so compare in float16 steps
    np.testing.assert_allclose(grey.astype(np.float32),
                               encoder.features(np.repeat(images[..., :1], 3, axis=-1)).astype(np.float32),
                               rtol=2 ** -9, atol=2 ** -14)


def test_the_local_vit_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 3
    net, info = train_local_vit(images, labels, num_classes=3, embed_dim=16, depth=1, num_heads=2, steps=3)
    path = save_local_vit(tmp_path / "vit.pt", net, info)
    encoder = load_external_encoder(LOCAL_VIT, path, resolution=8)
    assert encoder.feature_shape() == [16, 16]              # 8 px / patch 2 = a 4x4 grid, width 16
    with torch.no_grad():
        expected = net.forward_features((torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)
    # float16 features against the float32 network: half a float16 step (2^-11 relative) plus float32 noise
    np.testing.assert_allclose(encoder.features(images[:4]).astype(np.float32), expected[:, 1:].numpy(),
                               rtol=2 ** -10, atol=1e-4)


# --- through the encode and train stages ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def repa_data(ray_session, image_tree, tmp_path_factory):
    from sddit.reference import dataset_codec, dataset_images
    root = tmp_path_factory.mktemp("repa")
    plain = encode_pixels(image_tree[0], root / "pixel8", 8)
    parts = list(dataset_images(plain, dataset_codec(plain)))
    net, info = train_local_vit(np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                                num_classes=3, embed_dim=16, depth=1, num_heads=2, steps=5)
    weights = save_local_vit(root / "vit.pt", net, info)
    with_features = root / "pixel8-repa"
    encode_pixels(image_tree[0], with_features, 8, "--repa-encoder", LOCAL_VIT, "--repa-encoder-weights", str(weights))
    preset = root / "repa.yaml"
    preset.write_text(yaml.safe_dump(REPA_TINY))
    return root, plain, with_features, weights, preset


def test_encode_stores_the_features_of_each_image_and_of_its_mirror_image(repa_data, image_tree):
    from sddit.data import FEATURES_COLUMN, read_shard, read_tensor_column
    from sddit.image_folder import load_image
    _, plain, with_features, weights, _ = repa_data
    manifest = Manifest.read(with_features)
    assert manifest.features["column"] == FEATURES_COLUMN and manifest.features["encoder"] == LOCAL_VIT
    assert manifest.features["shape"] == [16, 16] and manifest.num_rows == Manifest.read(plain).num_rows
    table = read_shard(with_features / manifest.shards[0]["file"], [FEATURES_COLUMN, "flipped", "image_id"])
    features, flipped = read_tensor_column(table, FEATURES_COLUMN), table.column("flipped").to_numpy(zero_copy_only=False)
    image_id = table.column("image_id")[0].as_py()
    assert table.column("image_id")[1].as_py() == image_id and not flipped[0] and flipped[1]
    image, _, _ = load_image(str(image_tree[0] / image_id), 8)
    encoder = load_external_encoder(LOCAL_VIT, weights, resolution=8)
    np.testing.assert_array_equal(features[0], encoder.features(image[None])[0])
    np.testing.assert_array_equal(features[1], encoder.features(np.ascontiguousarray(image[None, :, ::-1]))[0])
    # the same images without features are another dataset: never mixed into one directory
    with pytest.raises(DataError, match="repa_encoder: existing 'local-vit' vs requested None"):
        encode_pixels(image_tree[0], with_features, 8)


def test_repa_trains_logs_its_term_and_resumes_bitwise(repa_data, tmp_path):
    from sddit.checkpoint import load_checkpoint
    from sddit.config import load_preset
    from sddit.training import LocalHooks, train_loop
    _, _, data, _, preset = repa_data
    config = load_preset(preset)
    straight = LocalHooks(tmp_path / "straight", verbose=False)
    metrics = train_loop(copy.deepcopy(config), data, hooks=straight)
    assert -1.0 <= metrics["loss_repa"] <= 1.0
    reference = load_checkpoint(straight.latest())
    assert any(k.startswith("projector.") for k in reference["model"])
    crashed = CrashAt(tmp_path / "crashed", at=4)
    with pytest.raises(KeyboardInterrupt):
        train_loop(copy.deepcopy(config), data, hooks=crashed)
    resumed = LocalHooks(tmp_path / "crashed", verbose=False)
    train_loop(copy.deepcopy(config), data, hooks=resumed, resume=load_checkpoint(crashed.latest()))
    final = load_checkpoint(resumed.latest())
    assert final["step"] == reference["step"] == 8
    assert state_equal(final["model"], reference["model"]) and state_equal(final["generation_ema"],
                                                                            reference["generation_ema"])


def test_a_repa_run_on_a_dataset_without_features_and_a_missing_encoder_are_one_line(repa_data, image_tree, tmp_path):
    _, plain, _, _, preset = repa_data
    result = subprocess.run([sys.executable, "pipelines/train.py", "--data", str(plain), "--preset", str(preset),
                             "--run-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("train: ") and "the dataset has no external features" in line
    result = subprocess.run([sys.executable, "pipelines/encode.py", "--data", str(image_tree[0]), "--out",
                             str(tmp_path / "out"), "--codec", "pixel", "--resolution", "8", "--repa-encoder",
                             LOCAL_VIT, "--repa-encoder-weights", str(tmp_path / "missing.pt")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"encode: REPA encoder weights {tmp_path / 'missing.pt'} do not exist")
    assert not (tmp_path / "out").exists()                 # refused before any work


def test_repa_arms_share_everything_but_the_term_and_refuse_a_dataset_without_features(repa_data, tmp_path):
    from pipelines.study import parse_args
    from pipelines.study_plan import plan_study
    _, plain, with_features, _, _ = repa_data
    base = copy.deepcopy(REPA_TINY)
    base["model"]["repa_weight"] = 0.0                      # the base has REPA's settings but not its term
    preset = tmp_path / "base.yaml"
    preset.write_text(yaml.safe_dump(base))
    args = parse_args(["--study", "repa", "--data", str(with_features), "--preset", str(preset), "--seeds", "1",
                       "--out", str(tmp_path)])
    plan = plan_study(args)
    assert plan["arms"] == ["DiT", "DiT-REPA", "SD-DiT", "SD-DiT-REPA"]
    from sddit.config import apply_overrides
    flat = {arm: apply_overrides(plan["base"], plan["runs"][f"{arm}@seed0"]["overrides"]).flat() for arm in plan["arms"]}
    for family in ("DiT", "SD-DiT"):
        assert {k for k, v in flat[f"{family}-REPA"].items() if v != flat[family][k]} == {"model.repa_weight"}
    args = parse_args(["--study", "repa", "--data", str(plain), "--preset", str(preset), "--seeds", "1",
                       "--out", str(tmp_path)])
    with pytest.raises(DataError, match="arm DiT-REPA: .*the dataset has no external features"):
        plan_study(args)
