"""Quality against steps for a preset in the bare loop: the evidence behind the demo's step budget.

    python bench/demo_curve.py --data runs/datasets/pixel-8 --steps 1500 --every 300 --out bench/results/demo_curve.jsonl

Trains the preset (plain PyTorch, no Ray) and, every --every steps, samples the generation EMA as the
evaluate stage does (same per-sample seeds, Heun steps and label order) and scores it with the domain
extractor: FID at CFG 1 and class agreement at CFG --cfg-scale. Step 0 is the untrained model, the
baseline of the demo's "FID below 10% of an untrained model's" target. Each point is appended to --out
as it is measured, with the training img/s of the interval before it (evaluation time excluded).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from sddit.config import apply_overrides, load_preset
from sddit.data import Manifest
from sddit.evaluation import compute_metrics
from sddit.reference import dataset_codec, load_reference, make_extractor
from sddit.sampling import SamplingPlan, sample_batch
from sddit.training import LoopHooks, build_training, dataset_info, fit_to_dataset, train_loop
from pipelines.common import at_least, shared_options
from bench.records import append_record


def parse_args(argv=None):
    shared = shared_options("--set",
                            set="config overrides")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared])
    parser.add_argument("--data", required=True, help="a pixel-codec dataset written by pipelines/encode.py")
    parser.add_argument("--preset", default="demo", help="preset name or YAML path (default demo)")
    parser.add_argument("--steps", type=at_least(1), default=1500, help="training steps (default 1500)")
    parser.add_argument("--every", type=at_least(1), default=300, help="steps between measurements (default 300)")
    parser.add_argument("--samples", type=int, default=500, help="samples per measurement (default 500)")
    parser.add_argument("--heun-steps", type=int, default=12, help="Heun steps per sample (default 12, the demo's)")
    parser.add_argument("--cfg-scale", type=float, default=5.0, help="guidance for class agreement (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", required=True, help="JSONL file the points are appended to")
    return parser.parse_args(argv)


class Curve(LoopHooks):
    def __init__(self, args, info: dict, codec):
        self.args, self.info, self.codec = args, info, codec
        self.extractor = make_extractor("domain", dataset_dir=args.data, codec=codec)
        self.reference = load_reference(None, self.extractor, dataset_dir=args.data, codec=codec)

    def score(self, ema) -> dict:
        point = {}
        for name, cfg_scale in (("cfg1", 1.0), ("cfg", self.args.cfg_scale)):
            plan = SamplingPlan(num_samples=self.args.samples, batch_size=self.args.samples,
                                num_classes=self.info["num_classes"], latent_shape=self.info["latent_shape"],
                                steps=self.args.heun_steps, cfg_scale=cfg_scale, seed=0)
            images, labels = sample_batch(ema, self.codec, 0, plan)
            metrics = compute_metrics(self.extractor, images, self.reference, labels)
            point[f"fid_{name}"] = metrics["fid_domain"]
            point[f"class_agreement_{name}"] = metrics["class_agreement_domain"]
        return point

    def evaluate(self, step, ema):
        return self.score(ema)

    def log(self, step, metrics, checkpoint_follows=False):
        self.write({"step": step, "images_per_s": metrics["images_per_s"],
                    **{k: v for k, v in metrics.items() if k.startswith(("fid_", "class_agreement_"))}})

    def write(self, point: dict) -> None:
        point = {"preset": self.args.preset, "overrides": self.args.overrides, "data": self.args.data, **point}
        print(json.dumps(point), flush=True)
        append_record(self.args.out, point)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = apply_overrides(load_preset(args.preset), [f"train.steps={args.steps}", f"train.log_every={args.every}",
                                                         f"train.checkpoint_every={args.steps}",
                                                         f"train.sample_every={args.steps}"] + list(args.overrides))
    manifest = Manifest.read(args.data)
    config = fit_to_dataset(config, manifest, args.data)
    curve = Curve(args, dataset_info(manifest, args.data), dataset_codec(args.data))
    torch.manual_seed(config.train.seed)                    # the weights the loop starts from
    _, _, untrained, _ = build_training(config)
    curve.write({"step": 0, **curve.score(untrained)})
    start = time.time()
    train_loop(config, args.data, hooks=curve)
    print(f"demo_curve: {args.steps} steps in {time.time() - start:.0f} s (evaluations included)", flush=True)


if __name__ == "__main__":
    main()
