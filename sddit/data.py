"""The data contract: image folders in, Parquet latent shards + manifest.json out (DESIGN.md).

Everything here is plain Python / PyArrow, so the encode stage (Ray) and the trainer (any
process) agree on one definition of a shard. The image folders are read by sddit.image_folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sddit.errors import StorageError, UserError

MANIFEST = "manifest.json"
SHARD_METADATA_KEY = b"sddit.shard"
FORMAT_VERSION = 2                          # 1: tensors as Parquet lists; 2: as fixed-size binary


class DataError(UserError, RuntimeError):
    """A dataset directory or input tree is unusable; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------
# Shards: one fixed-size binary value per tensor, its dtype and shape in the field's metadata
# ---------------------------------------------------------------------------------------------

FEATURES_COLUMN = "repa_features"           # an external encoder's patch tokens, float16 [T, D] (REPA)
TENSOR_METADATA_KEY = b"sddit.tensor"       # a tensor column's {"dtype", "shape"}
# Format 1 stored tensors as Arrow fixed-shape tensors, i.e. Parquet lists of scalars, whose decoding walks
# every value's repetition level; format 2 stores each row's tensor as one fixed-size binary value, which
# reads ~40x faster (docs/performance.md, "Figures behind the code"). The reader takes both.


def tensor_field(name: str, shape, dtype: str) -> pa.Field:
    shape = [int(d) for d in shape]
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    metadata = {TENSOR_METADATA_KEY: json.dumps({"dtype": dtype, "shape": shape}).encode()}
    return pa.field(name, pa.binary(nbytes), nullable=False, metadata=metadata)


def shard_schema(column: str, shape: tuple[int, ...], dtype: str, features_shape=None) -> pa.Schema:
    fields = [
        tensor_field(column, shape, dtype),
        pa.field("label", pa.int64()),
        pa.field("flipped", pa.bool_()),
        pa.field("image_id", pa.string()),
    ]
    if features_shape is not None:
        fields.append(tensor_field(FEATURES_COLUMN, features_shape, "float16"))
    return pa.schema(fields)


def tensor_spec(field: pa.Field) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a tensor column in either format; None for other columns."""
    if isinstance(field.type, pa.FixedShapeTensorType):                     # format 1
        return np.dtype(field.type.value_type.to_pandas_dtype()), tuple(field.type.shape)
    if pa.types.is_fixed_size_binary(field.type) and field.metadata and TENSOR_METADATA_KEY in field.metadata:
        spec = json.loads(field.metadata[TENSOR_METADATA_KEY])
        return np.dtype(spec["dtype"]), tuple(spec["shape"])
    return None


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _tensor_array(field: pa.Field, values: np.ndarray) -> pa.Array:
    dtype, shape = tensor_spec(field)
    values = np.ascontiguousarray(values, dtype=dtype)
    if values.shape[1:] != shape:
        raise ValueError(f"column {field.name!r}: tensors of shape {values.shape[1:]}, the schema says {shape}")
    return pa.FixedSizeBinaryArray.from_buffers(field.type, len(values), [None, pa.py_buffer(values.tobytes())])


def shard_table(schema: pa.Schema, values: np.ndarray, labels, flipped, image_ids, metadata: dict,
                features: np.ndarray | None = None) -> pa.Table:
    """One shard; `metadata` (skips and conversions of its images) rides in the Parquet footer, so it
    is written atomically with the rows it describes."""
    columns = [_tensor_array(schema.field(0), values), pa.array(labels, pa.int64()),
               pa.array(flipped, pa.bool_()), pa.array(image_ids, pa.string())]
    if features is not None:
        columns.append(_tensor_array(schema.field(FEATURES_COLUMN), features))
    return pa.Table.from_arrays(columns, schema=schema.with_metadata({SHARD_METADATA_KEY: json.dumps(metadata).encode()}))


def write_shard(path: str | Path, table: pa.Table) -> Path:
    """Write a shard atomically. Tensor columns skip dictionary encoding and statistics: float bytes
    never repeat, and a dictionary attempt on them costs more than the data."""
    tensors = [f.name for f in table.schema if tensor_spec(f) is not None]
    others = [name for name in table.schema.names if name not in tensors]
    return write_atomically(path, lambda f: pq.write_table(table, f, use_dictionary=others, write_statistics=others))


def write_atomically(path: str | Path, write) -> Path:
    """`write(f)` into a binary file under a temporary name beside `path`, then rename it over `path`:
    readers see the old file or the new one, never half of one (shards, manifests, checkpoints, caches)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as error:
        kept = "the previous version is unchanged" if path.exists() else "nothing was written there"
        failure = StorageError(f"{path}: could not write it ({error.strerror or error}); {kept}")
        failure.errno = error.errno
        raise failure from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_shard(path: Path, columns: list[str]) -> pa.Table:
    """The columns of one shard; a missing, truncated or corrupt file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: unreadable shard ({error}); re-encode it (rerun pipelines/encode.py into a "
                        f"fresh --out)") from error


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_shard_metadata(path: Path) -> dict:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(SHARD_METADATA_KEY, b'{"skipped": [], "conversions": {}}'))


def read_tensor_column(table: pa.Table, column: str) -> np.ndarray:
    """A tensor column (either format) as one numpy array [rows, *shape]; format 2 without a copy when the
    column is one chunk."""
    spec = tensor_spec(table.schema.field(column))
    if spec is None:
        raise DataError(f"column {column!r} is not a tensor column ({table.schema.field(column).type})")
    array = table.column(column).combine_chunks()
    if isinstance(array, pa.ExtensionArray):                                 # format 1
        return array.to_numpy_ndarray()
    dtype, shape = spec
    width = array.type.byte_width
    values = np.frombuffer(array.buffers()[1], dtype=np.uint8, count=len(array) * width, offset=array.offset * width)
    return values.view(dtype).reshape(len(array), *shape)


def decode_preview(directory: Path, manifest: "Manifest", codec, count: int = 16):
    """Decoded images from the first non-empty shard, as a grid (PIL), to prove the shards decode."""
    import torch

    from sddit.images import grid_image
    for shard in manifest.shards:
        if shard["rows"]:
            table = pq.read_table(directory / shard["file"]).slice(0, count)
            stored = torch.from_numpy(read_tensor_column(table, manifest.column).astype(np.float32))
            latent = codec.to_latent(stored, generator=torch.Generator().manual_seed(0))
            return grid_image(codec.decode(latent), nrow=8)
    return None


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------

@dataclass
class EncodeSettings:
    """What determines a dataset's rows: an existing directory is only continued with equal settings."""
    source: str
    codec: str
    vae: str | None
    resolution: int
    flip: bool
    limit_per_class: int | None
    rows_per_shard: int
    repa_encoder: str | None = None         # external features (REPA): the encoder and its weights' checksum
    repa_weights_sha256: str | None = None
    # which images share a shard: "shuffled", a fixed random order of the file list (every shard a sample of
    # all classes); "sorted", runs of the class-sorted list (datasets encoded before 2026-12)
    order: str = "sorted"


@dataclass
class Manifest:
    settings: EncodeSettings
    column: str
    scaling_factor: float
    latent_shape: list[int]                 # what the model sees: [C, H, W]
    stored_shape: list[int]                 # the column's tensor shape
    num_rows: int
    shards: list[dict]                      # {"file", "rows", "sha256"}
    classes: list[dict]                     # {"index", "wnid", "name"}
    skipped: list[dict]                     # {"image_id", "reason"}
    conversions: dict[str, int] = field(default_factory=dict)
    code_version: str = ""
    format_version: int = FORMAT_VERSION
    # external features for REPA: {"column", "encoder", "weights_sha256", "shape": [T, D]}; None: not encoded
    features: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def write(self, directory: Path) -> None:
        write_atomically(Path(directory) / MANIFEST, lambda f: f.write(json.dumps(asdict(self), indent=2).encode()))

    @classmethod
    def read(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise DataError(f"{path}: no manifest; is {str(directory)!r} the output of pipelines/encode.py "
                            f"(and did that run finish)?")
        try:
            data = json.loads(path.read_text())
            data["settings"] = EncodeSettings(**data["settings"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as error:
            raise DataError(f"{path}: not a valid sddit manifest ({error})") from error

    def check_shards(self, directory: str | Path) -> None:
        """Every listed shard exists, its Parquet footer reads and holds the listed rows: a cheap check
        (footers only) that catches a missing or truncated shard before any worker starts."""
        for shard in self.shards:
            path = Path(directory) / shard["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard listed in the manifest is missing")
            try:
                rows = pq.read_metadata(path).num_rows
            except (pa.ArrowException, OSError) as error:
                raise DataError(f"{path}: unreadable shard, truncated or not Parquet ({error}); re-encode the "
                                f"dataset (pipelines/encode.py into a fresh --out)") from error
            if rows != shard["rows"]:
                raise DataError(f"{path}: {rows} rows, but the manifest lists {shard['rows']}; re-encode the dataset")


# ---------------------------------------------------------------------------------------------
# Converting datasets written in an older format
# ---------------------------------------------------------------------------------------------

def upgrade_shard(table: pa.Table) -> pa.Table | None:
    """The table with its format-1 tensor columns rewritten in format 2 (same values); None if it has none."""
    old = [i for i, f in enumerate(table.schema) if isinstance(f.type, pa.FixedShapeTensorType)]
    if not old:
        return None
    for i in old:
        field = table.schema.field(i)
        dtype, shape = tensor_spec(field)
        new_field = tensor_field(field.name, shape, str(dtype))
        table = table.set_column(i, new_field, _tensor_array(new_field, read_tensor_column(table, field.name)))
    return table


def upgrade_dataset(directory: str | Path, progress=None) -> int:
    """Rewrite a dataset's format-1 shards in format 2 in place; returns how many it rewrote.

    Each shard is replaced atomically and the manifest (checksums, then the format) rewritten after it,
    so an interrupted upgrade leaves a readable dataset and a rerun continues where it stopped."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    rewritten = 0
    for shard in manifest.shards:
        path = directory / shard["file"]
        table = upgrade_shard(read_shard(path, None))
        if table is not None:
            write_shard(path, table)
            shard["sha256"] = file_sha256(path)
            manifest.write(directory)
            rewritten += 1
        if progress is not None:
            progress(1)
    manifest.format_version = FORMAT_VERSION
    manifest.write(directory)
    return rewritten
