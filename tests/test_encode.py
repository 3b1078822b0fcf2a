import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sddit.codecs import CodecError
from sddit.data import DataError, Manifest, read_tensor_column
from sddit.image_folder import center_crop, load_image, to_rgb

ROOT = Path(__file__).resolve().parents[1]


def run_encode(data, out, mlflow_dir, *extra):
    from pipelines.encode import main
    return main(["--data", str(data), "--out", str(out), "--run-dir", str(mlflow_dir), *extra])


def read_all(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def pixel_dataset(ray_session, image_tree, mlflow_dir, tmp_path_factory):
    root, expected = image_tree
    out = tmp_path_factory.mktemp("pixel") / "ds"
    manifest = run_encode(root, out, mlflow_dir, "--codec", "pixel", "--resolution", "32", "--rows-per-shard", "8")
    return out, manifest, expected


def test_pixel_shards_read_back_with_plain_pyarrow(pixel_dataset):
    out, manifest, expected = pixel_dataset
    table = read_all(out)
    # the data contract, format 2: one fixed-size binary value per row, its dtype and shape in the field's metadata
    column = table.schema.field("pixels")
    assert column.type == pa.binary(3 * 32 * 32)
    assert json.loads(column.metadata[b"sddit.tensor"]) == {"dtype": "uint8", "shape": [3, 32, 32]}
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("flipped").type == pa.bool_()
    pixels = np.frombuffer(b"".join(table.column("pixels").to_pylist()), np.uint8).reshape(-1, 3, 32, 32)
    assert pixels.shape == (table.num_rows, 3, 32, 32)
    assert np.array_equal(read_tensor_column(table, "pixels"), pixels)
    assert manifest.format_version == 2
    assert manifest.num_rows == table.num_rows == 2 * len(expected["good"])
    assert [s["rows"] for s in manifest.shards] == [pq.ParquetFile(out / s["file"]).metadata.num_rows
                                                    for s in manifest.shards]
    assert manifest.latent_shape == [3, 32, 32] and manifest.scaling_factor == 1.0


def test_labels_follow_sorted_folder_order(pixel_dataset):
    out, manifest, _ = pixel_dataset
    table = read_all(out).to_pydict()
    wnids = [c["wnid"] for c in manifest.classes]
    assert wnids == sorted(wnids) and [c["index"] for c in manifest.classes] == [0, 1, 2]
    for image_id, label in zip(table["image_id"], table["label"]):
        assert image_id.split("/")[0] == wnids[label]
    # the class-coloured images really carry their class's colour channel at full intensity
    pixels = read_tensor_column(read_all(out), "pixels")
    for i, (image_id, label) in enumerate(zip(table["image_id"], table["label"])):
        if image_id.split("/")[1].startswith("n0"):
            means = pixels[i].reshape(3, -1).mean(axis=1)
            assert means[label] > 220 and np.delete(means, label).max() < 170


def test_flip_rows_are_exact_mirrors(pixel_dataset):
    out, _, _ = pixel_dataset
    table = read_all(out)
    pixels = read_tensor_column(table, "pixels")
    flipped = table.column("flipped").to_pylist()
    ids = table.column("image_id").to_pylist()
    for i in range(0, len(ids), 2):
        assert (flipped[i], flipped[i + 1]) == (False, True) and ids[i] == ids[i + 1]
        assert np.array_equal(pixels[i + 1], pixels[i][:, :, ::-1])
        assert not np.array_equal(pixels[i], pixels[i + 1])


def test_bad_files_are_listed_and_nothing_else_is_lost(pixel_dataset):
    out, manifest, expected = pixel_dataset
    skipped = {s["image_id"]: s["reason"] for s in manifest.skipped}
    assert set(skipped) == set(expected["bad"])
    for path, keyword in expected["bad"].items():
        assert keyword in skipped[path], (path, skipped[path])
    assert sorted(set(read_all(out).column("image_id").to_pylist())) == expected["good"]
    assert manifest.conversions.get("l") == 1 and manifest.conversions.get("cmyk") == 1
    assert manifest.conversions.get("rgba") == 1 and manifest.conversions.get("i;16") == 1
    assert manifest.conversions.get("upsampled") == 1
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest.skipped and on_disk["code_version"]


def test_vae_codec_with_a_local_tiny_autoencoder(ray_session, image_tree, tiny_vae_dir, mlflow_dir, tmp_path):
    root, expected = image_tree
    out = tmp_path / "vae"
    manifest = run_encode(root, out, mlflow_dir, "--codec", "sd-vae", "--vae", str(tiny_vae_dir),
                          "--resolution", "16", "--limit-per-class", "3", "--no-flip")
    table = read_all(out)
    moments = read_tensor_column(table, "moments")
    assert moments.dtype == np.float16
    assert moments.shape == (table.num_rows, 8, 8, 8)       # [mean(4) | std(4)] at 16 px / 2
    assert (moments[:, 4:] > 0).all()                       # the std half is a standard deviation
    assert manifest.scaling_factor == pytest.approx(0.18215) and manifest.latent_shape == [4, 8, 8]
    assert not any(table.column("flipped").to_pylist())
    assert manifest.settings.vae == str(tiny_vae_dir)


def test_missing_vae_fails_at_start_naming_it(image_tree, tmp_path, monkeypatch, mlflow_dir):
    root, _ = image_tree
    with pytest.raises(CodecError, match="does-not-exist"):
        run_encode(root, tmp_path / "a", mlflow_dir, "--vae", str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    with pytest.raises(CodecError, match=r"stabilityai/sd-vae-ft-ema.*--vae DIR"):
        run_encode(root, tmp_path / "b", mlflow_dir)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()   # refused before any work


def test_existing_output_with_other_settings_is_refused(pixel_dataset, image_tree, tiny_vae_dir, mlflow_dir):
    out, _, _ = pixel_dataset
    root, _ = image_tree
    before = sorted(p.stat().st_mtime_ns for p in out.iterdir())
    with pytest.raises(DataError, match=r"resolution: existing 32 vs requested 16"):
        run_encode(root, out, mlflow_dir, "--codec", "pixel", "--resolution", "16", "--rows-per-shard", "8")
    with pytest.raises(DataError, match=r"codec: existing 'pixel' vs requested 'sd-vae'"):
        run_encode(root, out, mlflow_dir, "--resolution", "32", "--rows-per-shard", "8", "--vae", str(tiny_vae_dir))
    assert sorted(p.stat().st_mtime_ns for p in out.iterdir()) == before


def test_a_directory_from_before_the_shuffled_layout_is_not_continued(image_tree, mlflow_dir, tmp_path):
    """An interrupted encode from before shards mixed classes must not be finished in the new layout."""
    root, _ = image_tree
    out = tmp_path / "old"
    out.mkdir()
    settings = {"source": str(root.resolve()), "codec": "pixel", "vae": None, "resolution": 32, "flip": True,
                "limit_per_class": None, "rows_per_shard": 8, "repa_encoder": None, "repa_weights_sha256": None}
    (out / "encode_settings.json").write_text(json.dumps(settings))
    with pytest.raises(DataError, match=r"order: existing 'sorted' vs requested 'shuffled'"):
        run_encode(root, out, mlflow_dir, "--codec", "pixel", "--resolution", "32", "--rows-per-shard", "8")


def test_every_shard_is_a_sample_of_all_classes():
    from pipelines.encode import plan
    items = [(f"c{c}/{i}.JPEG", c) for c in range(10) for i in range(100)]      # class-sorted, as listed
    rows = plan(items, rows_per_shard=200, flip=True)                           # 100 images per shard
    assert sorted((r["image_id"], r["label"]) for r in rows) == sorted(items)  # every image exactly once
    assert rows == plan(items, rows_per_shard=200, flip=True)                   # the same layout every time
    for shard in range(10):
        labels = [r["label"] for r in rows if r["shard"] == shard]
        assert len(labels) == 100 and len(set(labels)) == 10 and max(np.bincount(labels)) <= 20


def test_default_shard_size_follows_the_row_size():
    from pipelines.encode import default_rows_per_shard
    sd_vae_256, sd_vae_512 = 8 * 32 * 32 * 2, 8 * 64 * 64 * 2                  # float16 [mean | std] moments
    dinov2_b = 256 * 768 * 2                                                    # REPA's features: 256 tokens x 768
    assert default_rows_per_shard(sd_vae_256) == 2048                           # 32 MiB, as before
    assert default_rows_per_shard(sd_vae_512) == 512                            # 32 MiB, not 128
    assert default_rows_per_shard(sd_vae_256 + dinov2_b) == 80                  # 31 MiB, not 800
    assert default_rows_per_shard(3 * 32 * 32) == 2048 and default_rows_per_shard(100 << 20) == 2


def test_killed_run_resumes_to_the_same_rows(pixel_dataset, image_tree, mlflow_dir, tmp_path):
    reference_out, reference, _ = pixel_dataset
    root, _ = image_tree
    out = tmp_path / "resumed"
    args = [sys.executable, str(ROOT / "pipelines/encode.py"), "--data", str(root), "--out", str(out),
            "--run-dir", str(mlflow_dir), "--codec", "pixel", "--resolution", "32", "--rows-per-shard", "8"]
    env = {**os.environ, "SDDIT_FAULT_ENCODE_EXIT_AFTER_SHARDS": "2"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    survivors = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert len(survivors) == 2 < len(reference.shards)
    (out / ".part-00002.parquet.tmp-deadbeef").write_bytes(b"half a shard")   # as a kill mid-write leaves

    resumed = run_encode(root, out, mlflow_dir, "--codec", "pixel", "--resolution", "32", "--rows-per-shard", "8")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in survivors} == survivors
    assert not list(out.glob(".part-*"))
    assert read_all(out).equals(read_all(reference_out))
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in reference.shards]
    assert resumed.skipped == reference.skipped and resumed.num_rows == reference.num_rows


def test_manifest_read_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        Manifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json: not a valid sddit manifest"):
        Manifest.read(tmp_path)


def test_center_crop_and_conversions():
    wide = Image.fromarray(np.zeros((100, 300, 3), np.uint8))
    assert center_crop(wide, 32).shape == (32, 32, 3)       # 300x100 -> BOX to 150x50 -> BICUBIC 96x32 -> crop
    small = Image.fromarray(np.full((10, 12, 3), 7, np.uint8))
    assert center_crop(small, 32).shape == (32, 32, 3)
    sixteen = Image.fromarray(np.array([[0, 32768, 65535, 65535]], dtype=np.uint16))
    rgb, conversion = to_rgb(sixteen)
    assert conversion.startswith("i") and np.asarray(rgb)[0, :, 0].tolist() == [0, 128, 255, 255]
    image, reason, _ = load_image("/definitely/not/here.JPEG", 32)
    assert image is None and reason.startswith("unreadable")
