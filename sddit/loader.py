"""Training data: each rank's disjoint share of the shard rows, reshuffled every epoch.

The position in the data is a pure function of the step: epoch = step // steps_per_epoch and
the epoch's permutation comes from (seed, epoch, rank). A checkpoint therefore only needs the
step to continue with exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from sddit.codecs import stored_to_latent
from sddit.data import DataError, Manifest, read_shard, read_tensor_column


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


class LatentLoader:
    def __init__(self, directory: str | Path, *, rank: int, world_size: int, batch_size: int, seed: int, device,
                 features: bool = False):
        self.directory = Path(directory)
        self.manifest = Manifest.read(directory)
        self.rank, self.seed, self.batch_size, self.device = rank, seed, batch_size, torch.device(device)
        feature_column = None
        if features:
            if self.manifest.features is None:
                raise DataError(f"{self.directory / 'manifest.json'}: the dataset has no external features "
                                f"(REPA); encode it with --repa-encoder")
            feature_column = self.manifest.features["column"]
        columns = [self.manifest.column, "label"] + ([feature_column] if feature_column else [])
        stored, labels, extra, offset = [], [], [], 0
        for shard in self.manifest.shards:
            path = self.directory / shard["file"]
            rows = np.arange(offset, offset + shard["rows"])
            mine = rows[rows % world_size == rank] - offset    # rank r owns every world_size-th row
            offset += shard["rows"]
            if len(mine):
                table = read_shard(path, columns).take(mine)
                stored.append(read_tensor_column(table, self.manifest.column))
                labels.append(table.column("label").to_numpy())
                if feature_column:
                    extra.append(read_tensor_column(table, feature_column))
        # equal shares, so every rank takes the same number of steps per epoch (DDP runs in lockstep)
        share = self.manifest.num_rows // world_size
        self.stored = torch.from_numpy(np.concatenate(stored)[:share])
        self.labels = torch.from_numpy(np.concatenate(labels)[:share].astype(np.int64))
        self.features = torch.from_numpy(np.concatenate(extra)[:share]) if feature_column else None
        self.steps_per_epoch = share // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"{self.directory}: {self.manifest.num_rows} rows cannot fill one batch of "
                            f"{batch_size} per worker on {world_size} workers")
        self._epoch, self._order = None, None

    def position(self, step: int) -> dict:
        epoch, index = divmod(step, self.steps_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": index, "steps_per_epoch": self.steps_per_epoch}

    def batch(self, step: int) -> Batch:
        """(x0 [B, C, H, W] on the device, labels [B]) for `step`; a fresh latent sample per read."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng(derived_seed(self.seed, epoch, self.rank))
            self._epoch, self._order = epoch, torch.from_numpy(rng.permutation(len(self.labels)))
        rows = self._order[index * self.batch_size:(index + 1) * self.batch_size]
        generator = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, self.rank, step, 1))
        stored = self.stored[rows].to(self.device, non_blocking=True)
        x0 = stored_to_latent(stored, self.manifest.column, self.manifest.scaling_factor, generator)
        features = None if self.features is None else self.features[rows].to(self.device, non_blocking=True)
        return Batch(x0, self.labels[rows].to(self.device, non_blocking=True), features)
