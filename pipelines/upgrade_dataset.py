"""Convert a dataset encoded in shard format 1 to format 2, in place (no re-encoding, same rows and values).

    python pipelines/upgrade_dataset.py /shared/latents/in256

Format 1 (before 2026-12) stored each tensor as a Parquet list of scalars, which reads ~40x slower than
format 2's one fixed-size binary value per row (README, "Training data at scale"). Training reads both;
this makes an old dataset fast. Each shard is replaced atomically and the manifest updated after it, so
the command can be interrupted and rerun. The shards' checksums change, so cached FID reference
statistics of the dataset are recomputed once.
"""
from __future__ import annotations

import argparse

from sddit.data import FORMAT_VERSION, Manifest, upgrade_dataset
from pipelines.common import Progress, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="dataset directory (the --out of pipelines/encode.py)")
    args = parser.parse_args(argv)
    manifest = Manifest.read(args.data)
    print(f"upgrade: {args.data}: format {manifest.format_version} -> {FORMAT_VERSION}, "
          f"{len(manifest.shards)} shards", flush=True)
    progress = Progress(len(manifest.shards), "upgrade", unit="shard")
    rewritten = upgrade_dataset(args.data, progress=progress.update)
    progress.close()
    print(f"upgrade: rewrote {rewritten} shards ({len(manifest.shards) - rewritten} were format {FORMAT_VERSION} "
          f"already)", flush=True)
    return rewritten


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("upgrade", main)


if __name__ == "__main__":
    cli()
