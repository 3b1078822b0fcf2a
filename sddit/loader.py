"""Training data: each rank streams its own shards, reshuffled every epoch, in bounded memory.

The position in the data is a pure function of the step, so a checkpoint only needs the step to continue
with exactly the batches an uninterrupted run would have seen:
- epoch e permutes the shards with a generator seeded by (seed, e); rank r owns the shards at positions
  r, r + W, r + 2W, ... of that order (disjoint shares; each rank reads only its own files; a dataset
  with fewer shards than workers is cut into equal pieces of shards first);
- a rank's shards are read `window` at a time, and the rows of a window are shuffled together with
  (seed, e, r, window index): a row can move anywhere inside its window of `window` consecutive shards,
  never into another window;
- every rank takes the same number of steps per epoch (DDP runs in lockstep): as many whole batches as the
  rank with the fewest rows could fill, so with uneven shards a rank may leave the end of an epoch unread.
Memory holds two windows (the current one and the next, read ahead on a thread) and that read's Parquet
buffers, whatever the dataset's size; start-up reads the manifest and the first two windows only.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sddit.codecs import stored_to_latent
from sddit.data import DataError, Manifest, read_shard, read_tensor_column

SHUFFLE_WINDOW = 4                          # shards per shuffle window (the encoder writes 32 MiB shards)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, step, ...), well mixed (SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, rank: int, step: int, device) -> torch.Generator:
    """The generator for every random draw of one step on one rank: resuming needs no RNG state."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, rank, step))


class Batch(NamedTuple):
    x0: torch.Tensor                        # clean latents [N, C, H, W]
    labels: torch.Tensor                    # [N] int64
    features: torch.Tensor | None           # the external encoder's features [N, T, D] (REPA), if loaded


class Window(NamedTuple):
    stored: np.ndarray                      # [rows, *stored shape], shuffled
    labels: np.ndarray                      # [rows] int64
    features: np.ndarray | None


class LatentLoader:
    def __init__(self, directory: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int, device,
                 features: bool = False, window: int = SHUFFLE_WINDOW):
        self.directory = Path(directory)
        self.manifest = Manifest.read(directory)
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.device, self.window = torch.device(device), window
        self.feature_column = None
        if features:
            if self.manifest.features is None:
                raise DataError(f"{self.directory / 'manifest.json'}: the dataset has no external features "
                                f"(REPA); encode it with --repa-encoder")
            self.feature_column = self.manifest.features["column"]
        # the unit a rank owns: a shard, or, when there are fewer shards than workers (a small dataset), an
        # equal piece of one: (shard, first row, end row)
        pieces = -(-world_size // max(len(self.manifest.shards), 1))
        self.blocks = np.array([(i, shard["rows"] * k // pieces, shard["rows"] * (k + 1) // pieces)
                                for i, shard in enumerate(self.manifest.shards) for k in range(pieces)],
                               dtype=np.int64).reshape(-1, 3)
        self.block_rows = self.blocks[:, 2] - self.blocks[:, 1]
        # the fewest rows a rank can own in any epoch: its share of blocks, the smallest ones
        blocks_per_rank = len(self.blocks) // world_size
        self.steps_per_epoch = int(np.sort(self.block_rows)[:blocks_per_rank].sum()) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.directory}: {self.manifest.num_rows} rows cannot fill one batch of "
                            f"{batch_size} per worker on {world_size} workers")
        self._epoch = None
        self._windows: dict[int, Window | Future] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="latent-reader")
        self._lock = threading.Lock()

    # --- where a step's rows are ---------------------------------------------------------------------------

    def position(self, step: int) -> dict:
        epoch, index = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": index, "steps_per_epoch": self.steps_per_epoch}

    def _plan_epoch(self, epoch: int) -> None:
        """This rank's shards for `epoch`, grouped in windows, and where each window starts in its row stream."""
        order = np.random.default_rng(derived_seed(self.seed, epoch)).permutation(len(self.blocks))
        mine = order[self.rank::self.world_size]
        self._groups = [mine[i:i + self.window] for i in range(0, len(mine), self.window)]
        self._starts = np.concatenate([[0], np.cumsum([self.block_rows[g].sum() for g in self._groups])])
        self._epoch = epoch
        with self._lock:
            self._windows.clear()

    # --- reading windows, one ahead --------------------------------------------------------------------------

    def _read_window(self, epoch: int, index: int, blocks: np.ndarray) -> Window:
        columns = [self.manifest.column, "label"] + ([self.feature_column] if self.feature_column else [])
        tables = []
        for shard, first, end in self.blocks[blocks]:
            table = read_shard(self.directory / self.manifest.shards[shard]["file"], columns)
            tables.append(table.slice(first, end - first) if end - first < table.num_rows else table)
        rows = sum(t.num_rows for t in tables)
        shuffle = np.random.default_rng(derived_seed(self.seed, epoch, self.rank, index)).permutation(rows)
        destination = np.argsort(shuffle)       # where each row read goes: window[j] = rows read[shuffle[j]]

        def gathered(column: str, tensor: bool) -> np.ndarray:
            """The column of every table, scattered straight into its shuffled place (one copy)."""
            out, offset = None, 0
            for table in tables:
                values = read_tensor_column(table, column) if tensor else table.column(column).to_numpy()
                if out is None:
                    out = np.empty((rows, *values.shape[1:]), dtype=values.dtype)
                out[destination[offset:offset + len(values)]] = values
                offset += len(values)
            return out

        features = gathered(self.feature_column, True) if self.feature_column else None
        return Window(gathered(self.manifest.column, True), gathered("label", False).astype(np.int64), features)

    def _window(self, index: int) -> Window:
        """Window `index` of the current epoch (waiting for the read-ahead if it is under way), with the next
        one read ahead; the windows before it are dropped."""
        epoch = self._epoch
        with self._lock:
            for old in [i for i in self._windows if i < index]:
                del self._windows[old]
            if index not in self._windows:
                self._windows[index] = self._reader.submit(self._read_window, epoch, index, self._groups[index])
            ahead = index + 1
            if ahead < len(self._groups) and ahead not in self._windows:
                self._windows[ahead] = self._reader.submit(self._read_window, epoch, ahead, self._groups[ahead])
            entry = self._windows[index]
        if isinstance(entry, Future):
            entry = entry.result()
            with self._lock:
                self._windows[index] = entry
        return entry

    # --- batches ---------------------------------------------------------------------------------------------

    def batch(self, step: int) -> Batch:
        """(x0 [B, C, H, W] on the device, labels [B]) for `step`; a fresh latent sample per read."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._plan_epoch(epoch)
        first, last = index * self.batch_size, (index + 1) * self.batch_size
        parts = []
        w = int(np.searchsorted(self._starts, first, side="right")) - 1
        while first < last:                             # a batch may span the end of one window and the next
            window, start = self._window(w), int(self._starts[w])
            take = slice(first - start, min(last, int(self._starts[w + 1])) - start)
            parts.append(Window(window.stored[take], window.labels[take],
                                None if window.features is None else window.features[take]))
            first = start + take.stop
            w += 1
        def joined(arrays):                             # one part (the usual case): a view, no copy
            return torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))

        stored = joined([p.stored for p in parts]).to(self.device, non_blocking=True)
        generator = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, self.rank, step, 1))
        x0 = stored_to_latent(stored, self.manifest.column, self.manifest.scaling_factor, generator)
        labels = joined([p.labels for p in parts]).to(self.device, non_blocking=True)
        features = None
        if self.feature_column:
            features = joined([p.features for p in parts]).to(self.device, non_blocking=True)
        return Batch(x0, labels, features)

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
