"""A full disk during a shard, checkpoint or sample write: the previous good state stays, the error names the file."""
import errno

import numpy as np
import pytest
import torch

from sddit.errors import StorageError


def fills_the_disk(real_write, after_bytes: int = 64):
    """A writer that gets `after_bytes` into the file, then fails the way a full disk does."""
    def write(*args, **kwargs):
        f = next(a for a in (*args, *kwargs.values()) if hasattr(a, "write"))
        f.write(b"\0" * after_bytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def leftovers(directory):
    return sorted(p.name for p in directory.rglob(".*tmp-*"))


def test_write_atomically_keeps_the_old_file_and_says_so(tmp_path):
    from sddit.data import write_atomically
    path = tmp_path / "file.bin"
    write_atomically(path, lambda f: f.write(b"good"))
    with pytest.raises(StorageError, match=r"file.bin: could not write it \(No space left on device\); the previous "
                                           r"version is unchanged") as caught:
        write_atomically(path, fills_the_disk(None))
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"good" and leftovers(tmp_path) == []
    with pytest.raises(StorageError, match="new.bin: could not write it .*; nothing was written there"):
        write_atomically(tmp_path / "new.bin", fills_the_disk(None))
    assert not (tmp_path / "new.bin").exists() and leftovers(tmp_path) == []


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tiny):
    from sddit import checkpoint
    from sddit.training import build_training
    config = tiny()
    model, optimizer, ema, _ = build_training(config)

    def save(step):
        return checkpoint.save_checkpoint(tmp_path / "ckpt", config=config, model=model, generation_ema=ema,
                                          optimizer=optimizer, step=step, images_seen=0, data_position={}, rng={},
                                          dataset={})

    path = save(10)
    monkeypatch.setattr(checkpoint.torch, "save", fills_the_disk(torch.save, after_bytes=4096))
    with pytest.raises(StorageError, match=r"ckpt/checkpoint.pt: could not write it .*previous version is unchanged"):
        save(20)
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(path)["step"] == 10 and leftovers(tmp_path) == []


def test_a_sample_batch_write_on_a_full_disk_leaves_the_batch_to_redo(tmp_path, monkeypatch):
    from sddit import sampling
    from sddit.sampling import SamplingPlan, finished_batches, write_batch
    plan = SamplingPlan(num_samples=8, batch_size=4, num_classes=2, latent_shape=[1, 2, 2])
    images = np.zeros((4, 2, 2, 1), dtype=np.uint8)
    write_batch(tmp_path, 0, images, np.array([0, 1, 0, 1]))
    monkeypatch.setattr(sampling.np, "savez", fills_the_disk(np.savez))
    with pytest.raises(StorageError, match=r"batch-00001.npz: could not write it .*nothing was written there"):
        write_batch(tmp_path, 1, images, np.array([0, 1, 0, 1]))
    monkeypatch.undo()
    assert finished_batches(tmp_path, plan) == {0}          # a rerun draws batch 1 again, and only it
    assert leftovers(tmp_path) == []


def test_a_shard_write_on_a_full_disk_keeps_the_finished_shards(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from pipelines.encode import ShardWriter
    from sddit.data import read_shard, shard_name, shard_schema
    schema = shard_schema("pixels", (1, 2, 2), "uint8")
    writer = ShardWriter(tmp_path, schema, flip=False, crash_after=None)

    def batch(shard):
        return {"image_id": np.array([f"{shard}-a", f"{shard}-b"]), "label": np.array([0, 1]),
                "shard": np.array([shard, shard]), "ok": np.array([True, True]), "conversion": np.array(["", ""]),
                "reason": np.array(["", ""]), "stored": np.ones((2, 1, 2, 2), dtype=np.uint8)}

    writer.add(batch(0))
    writer.add(batch(1))                                    # shard 0 is complete and written here
    monkeypatch.setattr(pq, "write_table", fills_the_disk(pq.write_table))
    with pytest.raises(StorageError, match=rf"{shard_name(1)}: could not write it .*nothing was written there"):
        writer.flush()
    monkeypatch.undo()
    assert read_shard(tmp_path / shard_name(0), ["label"]).num_rows == 2
    assert not (tmp_path / shard_name(1)).exists() and leftovers(tmp_path) == []   # a rerun encodes shard 1 again
