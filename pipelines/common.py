"""Small helpers the Ray entry points share: starting Ray, progress reporting."""
from __future__ import annotations

import sys
import time


def init_ray(address: str | None = None, **kwargs):
    """Connect to `address` ("auto" for an existing cluster) or start a local runtime; reuse one if running."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, **kwargs)
    return ray


def cpus_per_worker(ray, num_workers: int) -> int:
    """The most CPUs each of `num_workers` workers can reserve so that all of them fit on the
    cluster's nodes at once. A worker cannot span nodes, so the total alone is not enough: two
    one-CPU nodes hold two one-CPU workers but not one two-CPU worker."""
    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    fitting = [cpus for cpus in range(1, max(node_cpus, default=1) + 1)
               if sum(n // cpus for n in node_cpus) >= num_workers]
    return max(fitting, default=1)


class Progress:
    """A tqdm bar on a terminal; a plain line every `every` seconds otherwise (logs, CI, ray job logs)."""

    def __init__(self, total: int, desc: str, unit: str = "img", every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self.start = self.last = time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.time() - self.last >= self.every or self.done >= self.total:
            self.last = time.time()
            rate = self.done / max(self.last - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s)", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
