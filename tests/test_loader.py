"""The training reader: disjoint streamed shares, a pure function of the step, bounded memory."""
from pathlib import Path

import numpy as np
import pytest

import sddit.loader as loader_module
from sddit.loader import LatentLoader

from bench.synthetic_latents import write_latent_dataset

ROWS = 300


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """300 rows in shards of 16 (the last one 12); a row's label is its index (classes >= rows)."""
    out = tmp_path_factory.mktemp("latents") / "data"
    write_latent_dataset(out, ROWS, rows_per_shard=16, stored_shape=(2, 2, 2), classes=ROWS)
    return out


def epoch_rows(directory, rank, world_size, epoch, batch_size=8, window=3):
    loader = LatentLoader(directory, rank=rank, world_size=world_size, batch_size=batch_size, seed=5, device="cpu",
                          window=window)
    spe = loader.steps_per_epoch
    rows = np.concatenate([loader.batch(epoch * spe + i).labels.numpy() for i in range(spe)])
    loader.close()
    return rows, spe


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_take_disjoint_equal_shares_each_epoch(latents, world_size):
    shares = [epoch_rows(latents, rank, world_size, epoch=1) for rank in range(world_size)]
    steps = {spe for _, spe in shares}
    assert len(steps) == 1                                              # lockstep: the same steps on every rank
    rows = np.concatenate([r for r, _ in shares])
    assert len(np.unique(rows)) == len(rows)                            # disjoint, and no row twice in an epoch
    # at most the rows of one 16-row shard per rank left unread
    assert len(rows) >= ROWS - world_size * 16 - world_size * 8


def test_every_epoch_is_a_new_order(latents):
    first, _ = epoch_rows(latents, 0, 1, epoch=0)
    second, _ = epoch_rows(latents, 0, 1, epoch=1)
    assert len(set(first) & set(second)) >= len(first) - 8              # the rows left over differ, at most a batch
    assert not np.array_equal(first[:50], second[:50])


def test_rows_move_only_within_their_window_of_shards(latents):
    loader = LatentLoader(latents, rank=1, world_size=2, batch_size=8, seed=5, device="cpu", window=3)
    loader.batch(0)
    shards = loader._groups[0]                                         # the first window's shards
    in_window = np.concatenate([np.arange(s * 16, min(s * 16 + 16, ROWS)) for s in loader.blocks[shards, 0]])
    size = len(in_window)
    rows = np.concatenate([loader.batch(i).labels.numpy() for i in range(size // 8)])
    assert set(rows) <= set(in_window)
    loader.close()


def test_any_step_read_cold_equals_the_same_step_read_in_order(latents):
    """What exact resume needs: a new reader asked for step s returns what a reader that got there returns."""
    warm = LatentLoader(latents, rank=0, world_size=2, batch_size=8, seed=5, device="cpu", window=3)
    spe = warm.steps_per_epoch
    in_order = [warm.batch(step) for step in range(3 * spe)]
    for step in (0, 5, spe - 1, spe, 2 * spe + 3):
        cold = LatentLoader(latents, rank=0, world_size=2, batch_size=8, seed=5, device="cpu", window=3)
        batch = cold.batch(step)
        assert np.array_equal(batch.labels, in_order[step].labels)
        assert np.array_equal(batch.x0, in_order[step].x0)                # the same latent sample, too
        cold.close()
    warm.close()


def test_memory_holds_two_windows_and_start_up_reads_only_its_own_shards(latents, monkeypatch):
    read = []
    real = loader_module.read_shard

    def recording(path, columns):
        read.append(Path(path).name)
        return real(path, columns)

    monkeypatch.setattr(loader_module, "read_shard", recording)
    files = {}
    for rank in range(2):
        read.clear()
        loader = LatentLoader(latents, rank=rank, world_size=2, batch_size=8, seed=5, device="cpu", window=3)
        loader.batch(0)
        loader._reader.submit(lambda: None).result()                    # let the read-ahead finish
        mine = {loader.manifest.shards[s]["file"] for g in loader._groups[:2] for s in loader.blocks[g, 0]}
        assert set(read) <= mine and len(read) <= 6                    # the first window and the next
        files[rank] = set(read)
        for step in range(loader.steps_per_epoch):
            loader.batch(step)
            assert len(loader._windows) <= 2
        loader.close()
    assert not files[0] & files[1]


def test_a_dataset_with_fewer_shards_than_workers_is_split_into_pieces(tmp_path):
    write_latent_dataset(tmp_path / "one", 50, rows_per_shard=64, stored_shape=(2, 2, 2), classes=50)
    halves = [epoch_rows(tmp_path / "one", rank, 2, epoch=0) for rank in range(2)]
    rows = np.concatenate([r for r, _ in halves])
    assert len(np.unique(rows)) == len(rows) == 2 * 3 * 8              # 25 rows each: 3 batches of 8


# --- shard formats -------------------------------------------------------------------------------------------

def as_format_1(directory: Path) -> None:
    """Rewrite a dataset the way encoders before format 2 wrote it: tensors as Arrow fixed-shape tensors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sddit.data import Manifest, file_sha256, read_tensor_column, tensor_spec
    manifest = Manifest.read(directory)
    for shard in manifest.shards:
        path = directory / shard["file"]
        table = pq.read_table(path)
        for i, field in enumerate(table.schema):
            if tensor_spec(field) is not None:
                dtype, shape = tensor_spec(field)
                values = read_tensor_column(table, field.name)
                tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(dtype), list(shape))
                storage = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(shape)))
                table = table.set_column(i, pa.field(field.name, tensor_type),
                                         pa.ExtensionArray.from_storage(tensor_type, storage))
        pq.write_table(table, path)
        shard["sha256"] = file_sha256(path)
    manifest.format_version = 1
    manifest.write(directory)


def all_batches(directory, steps=12):
    loader = LatentLoader(directory, rank=0, world_size=2, batch_size=8, seed=5, device="cpu", window=3)
    batches = [loader.batch(step) for step in range(steps)]
    loader.close()
    return batches


def test_format_1_datasets_read_the_same_and_upgrade_in_place(latents, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sddit.data import Manifest, file_sha256, upgrade_dataset
    old = tmp_path / "old"
    shutil.copytree(latents, old)
    as_format_1(old)
    assert isinstance(pq.read_schema(old / "part-00000.parquet").field("moments").type, pa.FixedShapeTensorType)
    expected = all_batches(latents)
    for got, want in zip(all_batches(old), expected):                  # old datasets keep loading, unchanged
        assert np.array_equal(got.labels, want.labels) and np.array_equal(got.x0, want.x0)

    footers = {path.name: pq.read_schema(path).metadata for path in old.glob("part-*.parquet")}
    assert upgrade_dataset(old) == len(Manifest.read(old).shards)
    assert footers == {path.name: pq.read_schema(path).metadata for path in old.glob("part-*.parquet")}  # skips kept
    manifest = Manifest.read(old)
    assert manifest.format_version == 2
    assert all(shard["sha256"] == file_sha256(old / shard["file"]) for shard in manifest.shards)
    assert pq.read_schema(old / "part-00000.parquet").field("moments").type == pa.binary(2 * 2 * 2 * 2)
    for got, want in zip(all_batches(old), expected):
        assert np.array_equal(got.labels, want.labels) and np.array_equal(got.x0, want.x0)
    assert upgrade_dataset(old) == 0                                    # nothing left to convert


def test_an_interrupted_upgrade_leaves_a_readable_dataset_and_a_rerun_finishes_it(latents, tmp_path, monkeypatch):
    import shutil

    import sddit.data as data_module
    from sddit.data import Manifest, StorageError, file_sha256, upgrade_dataset
    old = tmp_path / "old"
    shutil.copytree(latents, old)
    as_format_1(old)
    real, writes = data_module.write_shard, []

    def disk_full_on_the_third(path, table):
        if len(writes) == 2:
            raise StorageError(f"{path}: could not write it (No space left on device); the previous version is unchanged")
        writes.append(path)
        return real(path, table)

    monkeypatch.setattr(data_module, "write_shard", disk_full_on_the_third)
    with pytest.raises(StorageError, match="No space left"):
        upgrade_dataset(old)
    manifest = Manifest.read(old)
    assert manifest.format_version == 1                                 # not claimed before every shard is done
    assert all(shard["sha256"] == file_sha256(old / shard["file"]) for shard in manifest.shards)
    expected = all_batches(latents)
    for got, want in zip(all_batches(old), expected):                  # a mix of formats reads the same
        assert np.array_equal(got.labels, want.labels) and np.array_equal(got.x0, want.x0)
    monkeypatch.setattr(data_module, "write_shard", real)
    assert upgrade_dataset(old) == len(manifest.shards) - 2
    assert Manifest.read(old).format_version == 2


def test_training_entry_points_say_when_a_dataset_is_slow_or_class_sorted(latents, tmp_path, capsys):
    import dataclasses
    import shutil

    from pipelines.common import warn_about_layout
    from sddit.data import Manifest
    warn_about_layout("train", Manifest.read(latents), latents)
    assert capsys.readouterr().out == ""                               # format 2, classes mixed: nothing to say
    old = tmp_path / "old"
    shutil.copytree(latents, old)
    as_format_1(old)
    manifest = Manifest.read(old)
    manifest.settings = dataclasses.replace(manifest.settings, order="sorted")
    warn_about_layout("study", manifest, old)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith(f"study: {old} is in shard format 1") and "pipelines/upgrade_dataset.py" in out[0]
    assert "class-sorted shards" in out[1] and "re-encode it" in out[1]
