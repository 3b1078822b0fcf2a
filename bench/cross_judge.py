"""Score the same samples under several domain judges: are FIDs from two studies comparable?

A study's FID comes from the domain classifier trained on its reference dataset (cached next to its
shards). Two judges trained on the same held-out images, in another shard order or on another subset,
are different networks; this draws each checkpoint's samples once (CFG 1, balanced labels, seed 0, as
a study's evaluation points) and scores them under every judge given.

    python bench/cross_judge.py --judge old=runs/data/old-sorted/fmnist16/test --judge new=runs/data/fmnist16/test \
        --checkpoint dit=runs/ray/<run>/checkpoint_<time> --out bench/results/cross_judge.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sddit.checkpoint import generator_of, load_checkpoint
from sddit.codecs import make_codec
from sddit.evaluation import compute_metrics
from sddit.reference import load_reference, make_extractor
from sddit.sampling import SamplingPlan, sample_batch
from bench.records import append_record


def named(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", type=named, action="append", required=True,
                        help="NAME=DATASET_DIR: that dataset's domain judge and reference statistics (repeatable)")
    parser.add_argument("--checkpoint", type=named, action="append", required=True,
                        help="NAME=CHECKPOINT_DIR of a pixel-codec run (repeatable)")
    parser.add_argument("--samples", type=int, default=500, help="samples per checkpoint (default 500, as the studies)")
    parser.add_argument("--heun-steps", type=int, default=12, help="Heun steps (default 12, as the studies)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cross_judge.jsonl"),
                        help="JSON-lines file a record per checkpoint is appended to")
    args = parser.parse_args(argv)
    judges = {}
    for name, directory in args.judge:
        extractor = make_extractor("domain", dataset_dir=directory)
        judges[name] = (directory, extractor, load_reference(None, extractor, dataset_dir=directory))
    records = []
    for name, path in args.checkpoint:
        payload = load_checkpoint(path)
        ema, dataset = generator_of(payload), payload["dataset"]
        plan = SamplingPlan(num_samples=args.samples, batch_size=args.samples, num_classes=dataset["num_classes"],
                            latent_shape=dataset["latent_shape"], steps=args.heun_steps, cfg_scale=1.0, seed=0)
        with torch.no_grad():
            images, labels = sample_batch(ema, make_codec(dataset["codec"], dataset["vae"] or ""), 0, plan)
        record = {"checkpoint": name, "path": str(path), "step": payload["step"], "samples": args.samples}
        for judge, (directory, extractor, reference) in judges.items():
            record[f"fid[{judge}]"] = compute_metrics(extractor, images, reference, labels)["fid_domain"]
            record[f"judge[{judge}]"] = {"dir": directory, "sha256": extractor.weights_checksum,
                                         "held_out_accuracy": extractor.accuracy}
        print(json.dumps(record), flush=True)
        append_record(args.out, record)
        records.append(record)
    return records


if __name__ == "__main__":
    main()
