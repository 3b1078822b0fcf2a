"""The whole pipeline: encode -> tune -> train -> evaluate, under one MLflow parent run.

    python pipelines/full_run.py                      # the embedded demo, local Ray, CPU, minutes
    python pipelines/full_run.py --cluster --preset imagenet256-XL2 --data /shared/imagenet/train \\
        --storage /shared/sddit --inception-weights /shared/weights/pt_inception-2015-12-05-6726825d.pth \\
        --reference /shared/VIRTUAL_imagenet256_labeled.npz

With no arguments it writes scikit-learn's bundled handwritten digits as an image folder, encodes
them with the pixel codec, runs a small sweep, trains the best config onwards from the best
trial's checkpoint, and evaluates with the domain extractor. Every stage skips work already done,
so re-running the same command continues rather than repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STARTED = time.time()   # run as a script, the wall clock starts here: before the project's and the libraries' imports

from pipelines.common import run_cli, set_verbose, shared_options
from sddit.config import load_preset
from sddit.errors import ConfigError

STAGES = ("encode", "tune", "train", "evaluate")
DEMO_SPACE = Path(__file__).resolve().parents[1] / "sddit" / "presets" / "spaces" / "demo.yaml"


def parse_args(argv=None):
    shared = shared_options("--address", "--storage", "--run-dir", "--verbose",
                            address="Ray address with --cluster (default 'auto')",
                            storage="storage every node can reach, for shards, checkpoints and results (default RUN_DIR)",
                            run_dir="local run directory: the MLflow store (unless MLFLOW_TRACKING_URI is set) and the "
                                    "summary (default runs/)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared])
    parser.add_argument("--cluster", action="store_true", help="connect to a running Ray cluster instead of starting one")
    parser.add_argument("--preset", default="demo", help="preset for the whole run (default demo)")
    parser.add_argument("--data", default=None, help="image folder ROOT/<class>/<images> (default: the bundled digits)")
    parser.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="VAE hub id or local directory (sd-vae presets)")
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights file (inception extractor)")
    parser.add_argument("--reference", default=None, help="ADM reference .npz (default: statistics of the training shards)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--num-workers", type=int, default=None, help="training workers (default 1 locally, all GPUs on --cluster)")
    parser.add_argument("--sweep-samples", type=int, default=None, help="sweep trials (default 2 demo, 16 cluster)")
    parser.add_argument("--sweep-budget", type=int, default=None, help="steps per trial (default 40 demo, 20000 cluster)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="final training steps (default: the preset's, less the sweep budget for the demo)")
    parser.add_argument("--eval-samples", type=int, default=None, help="samples per evaluation (default 500 demo, 50000)")
    parser.add_argument("--eval-steps", type=int, default=None, help="Heun steps for evaluation (default 12 demo, 40)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance for the recognisability check (default 5 demo, 1.5)")
    parser.add_argument("--guided-samples", type=int, default=None,
                        help="samples for the guided evaluation (default: 200 demo, where it only checks that samples "
                             "show the class asked for; otherwise --eval-samples, as it gives the headline FID)")
    parser.add_argument("--eval-precision", default="fp32", choices=["fp32", "bf16"],
                        help="the sampling network under bf16 autocast or in fp32 (default fp32; see evaluate.py)")
    parser.add_argument("--eval-compile", action="store_true",
                        help="torch.compile the sampling network (faster on a GPU; default eager; see evaluate.py)")
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if args.cluster and not args.data and args.preset != "demo":
        parser.error("--cluster with a non-demo preset needs --data (the image folder on shared storage)")
    return args


class Plan:
    """Where everything goes and how big each stage is, derived once from the arguments."""

    def __init__(self, args):
        demo = args.preset == "demo"
        self.config = load_preset(args.preset)
        self.run_dir = Path(args.run_dir).resolve()
        self.storage = Path(args.storage).resolve() if args.storage else self.run_dir
        self.images = Path(args.data).resolve() if args.data else self.storage / "demo" / "digits"
        self.dataset = self.storage / "datasets" / f"{self.config.data.codec}-{self.config.data.resolution}"
        self.name = Path(args.preset).stem
        self.codec = self.config.data.codec
        self.extractor = "domain" if self.codec == "pixel" else "inception"
        self.sweep_samples = args.sweep_samples or (2 if demo else 16)
        self.sweep_budget = args.sweep_budget or (40 if demo else 20_000)
        # the final training starts from the best trial's weights, so the sweep's budget counts towards it
        self.train_steps = args.train_steps or max(self.config.train.steps - (self.sweep_budget if demo else 0), 1)
        self.eval_samples = args.eval_samples or (500 if demo else 50_000)
        self.eval_steps = args.eval_steps or (12 if demo else 40)
        self.cfg_scale = args.cfg_scale or (5.0 if demo else 1.5)
        # balanced labels: 200 give 20 per digit, enough for the agreement figure and the summary grid's rows
        self.guided_samples = args.guided_samples or (min(self.eval_samples, 200) if demo else self.eval_samples)
        self.flip = not demo                                # a mirrored digit is not a digit


def stage_started(stage: str) -> float:
    print(f"full_run: {stage} started", flush=True)
    return time.time()


def stage_done(stage: str, start: float) -> float:
    seconds = time.time() - start
    print(f"full_run: {stage} done in {seconds:.0f} s", flush=True)
    return seconds


def run_stages(args, plan: Plan, ray) -> dict:
    from pipelines import encode, evaluate, train
    from tuning import sweep

    stages = args.stages.split(",")
    # what every stage shares: where MLflow and checkpoints go, the cluster (locally: a runtime of its own), the console
    common = dict(run_dir=str(plan.run_dir), address=(args.address or "auto") if args.cluster else None,
                  verbose=args.verbose)
    storage = str(plan.storage / "ray")
    num_workers = args.num_workers or (int(ray.cluster_resources().get("GPU", 0)) or 1 if args.cluster else 1)
    use_gpu = bool(args.cluster and ray.cluster_resources().get("GPU", 0))
    # seconds spent in optimiser steps (sweep trials and final training); the rest of the wall time is overhead
    summary: dict = {"stages": {}, "step_seconds": 0.0}

    if "encode" in stages:
        start = stage_started("encode")
        if args.data is None:
            from pipelines.demo_data import write_digits
            write_digits(plan.images)
        encode.encode(encode.EncodeOptions(data=str(plan.images), out=str(plan.dataset), codec=plan.codec,
                                           vae=args.vae, resolution=plan.config.data.resolution, flip=plan.flip,
                                           **common))
        summary["stages"]["encode"] = stage_done("encode", start)

    preset, init_from, parameter_plot = args.preset, None, None
    if "tune" in stages:
        start = stage_started("tune")
        # locally: all trials at once (the demo's two on one CPU each), each to its full budget with one proxy
        # FID at the end, drawn like the final evaluation's (early stopping saves little at this size, and a
        # stopped trial's worker dies mid-step)
        local = {} if args.cluster else dict(max_concurrent=plan.sweep_samples, scheduler="none", proxy_samples=100,
                                             proxy_heun_steps=plan.eval_steps, proxy_every=plan.sweep_budget)
        result = sweep.run(sweep.SweepOptions(data=str(plan.dataset), preset=args.preset,
                                              num_samples=plan.sweep_samples, budget_steps=plan.sweep_budget,
                                              name=f"sweep-{plan.name}", storage=storage, resume=True,
                                              **({"space": str(DEMO_SPACE)} if args.preset == "demo" else {}),
                                              **local, **common),
                           wait_for_plot=False)
        parameter_plot = result["parameter_plot"]           # drawn while the final training starts
        preset, init_from = result["best_config"], result["best_checkpoint"]
        summary["stages"]["tune"] = stage_done("tune", start)
        summary["best_params"] = result["best"]["params"]
        # trials that ran side by side shared the CPUs: their steps took the sum over the concurrency in wall time
        summary["step_seconds"] += sum(trial.get("step_seconds") or 0.0 for trial in result["trials"]) / max(
            result["max_concurrent"], 1)

    checkpoint = None
    if "train" in stages:
        start = stage_started("train")
        result = train.train(train.TrainOptions(data=str(plan.dataset), preset=str(preset), steps=plan.train_steps,
                                                num_workers=num_workers, name=f"final-{plan.name}", storage=storage,
                                                use_gpu=use_gpu, init_from=init_from, **common))
        checkpoint = result["checkpoint"]
        summary["step_seconds"] += (result["metrics"] or {}).get("step_seconds", 0.0)
        summary["stages"]["train"] = stage_done("train", start)
        summary["checkpoint"] = checkpoint

    if "evaluate" in stages:
        if checkpoint is None:
            raise ConfigError("stages", "evaluate needs the train stage in the same run (its checkpoint)")
        start = stage_started("evaluate")

        def evaluated(source, cfg_scale: float, num_samples: int) -> tuple[dict, Path]:
            options = evaluate.EvaluateOptions(
                checkpoint=str(source), cfg_scale=cfg_scale, num_samples=num_samples, steps=plan.eval_steps,
                extractor=plan.extractor, precision=args.eval_precision, compile=args.eval_compile,
                reference=args.reference, inception_weights=args.inception_weights, **common)
            return evaluate.evaluate(options, keep_actors=True)

        # FID at CFG 1 (the comparable number), and at the demo's guidance for recognisability; the three
        # evaluations share their sampling actors
        try:
            summary["metrics_cfg1"], _ = evaluated(checkpoint, 1.0, plan.eval_samples)
            summary["metrics_cfg"], guided = evaluated(checkpoint, plan.cfg_scale, plan.guided_samples)
            summary["metrics_untrained_cfg1"], _ = evaluated(
                untrained_checkpoint(checkpoint, plan.storage / "untrained"), 1.0, plan.eval_samples)
        finally:
            evaluate.release_sampling_actors()
        summary["cfg_scale"], summary["guided_samples"] = plan.cfg_scale, plan.guided_samples
        summary["samples"] = str(write_summary_grid(guided, plan))
        summary["stages"]["evaluate"] = stage_done("evaluate", start)
    if parameter_plot is not None:
        parameter_plot.result()
    return summary


def untrained_checkpoint(trained: str, directory: Path) -> Path:
    """The same model at initialisation, for the 'better than untrained' baseline (written once)."""
    import torch

    from sddit.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
    from sddit.training import build_training
    if (directory / CHECKPOINT_FILE).exists():
        return directory
    payload = load_checkpoint(trained)
    torch.manual_seed(payload["config"].train.seed)
    model, optimizer, ema, _ = build_training(payload["config"])
    save_checkpoint(directory, config=payload["config"], model=model, generation_ema=ema, optimizer=optimizer,
                    step=0, images_seen=0, data_position={}, rng={}, dataset=payload["dataset"])
    return directory


def write_summary_grid(samples_dir: Path, plan: Plan) -> Path:
    """A row per class from the guided evaluation's samples, next to the run directory."""
    import numpy as np
    import torch

    from sddit.images import save_grid
    samples = np.load(samples_dir / "samples.npz")
    images, labels = samples["arr_0"], samples["arr_1"]
    classes = sorted(set(labels.tolist()))[:10]
    rows = [images[labels == c][:10] for c in classes]
    grid = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return save_grid(grid, plan.run_dir / f"{plan.name}_samples.png", nrow=10, scale=4)


def main(argv=None) -> dict:
    import mlflow

    from pipelines.common import init_ray
    from pipelines.tracking import PARENT_ENV, params_key
    start = STARTED if __name__ == "__main__" else time.time()
    args = parse_args(argv)
    set_verbose(args.verbose)
    plan = Plan(args)
    params = {"preset": args.preset, "stages": args.stages, "cluster": args.cluster, "data": str(plan.images),
              "storage": str(plan.storage)}
    tags = {"sddit.stage": "pipeline", "sddit.pipeline_key": params_key(params)}
    # Starting a local Ray runtime is mostly waiting for its processes; the MLflow store and the stages'
    # imports happen meanwhile
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="setup") as pool:
        setup = pool.submit(open_store, plan.run_dir, tags)
        ray = init_ray((args.address or "auto") if args.cluster else None)
        uri, experiment, interrupted = setup.result()
    if interrupted is not None:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(interrupted.info.start_time / 1000))
        print(f"full_run: continuing the interrupted pipeline run {interrupted.info.run_id} (started {started})",
              flush=True)
    context = (mlflow.start_run(run_id=interrupted.info.run_id) if interrupted is not None else
               mlflow.start_run(run_name=f"full_run {plan.name}", tags=tags))
    with context as parent:
        if interrupted is None:
            mlflow.log_params(params)
        os.environ[PARENT_ENV] = parent.info.run_id         # every stage's run becomes a child of this one
        try:
            summary = run_stages(args, plan, ray)
        finally:
            del os.environ[PARENT_ENV]
        summary["wall_s"] = time.time() - start
        numeric = {f"{prefix}.{k}": v for prefix in ("metrics_cfg1", "metrics_cfg", "metrics_untrained_cfg1")
                   for k, v in summary.get(prefix, {}).items()}
        mlflow.log_metrics({**numeric, "wall_s": summary["wall_s"]})
        summary["mlflow_run_id"] = parent.info.run_id
        if "samples" in summary:
            mlflow.log_artifact(summary["samples"])
    (plan.run_dir / f"{plan.name}_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, plan, uri, experiment.experiment_id)
    return summary


def open_store(run_dir: Path, tags: dict):
    """(tracking URI, experiment, the unfinished pipeline run with these tags or None), with the stages'
    modules imported: what the driver prepares while Ray starts. An interrupted run of the same command is
    continued, so a pipeline run lists each stage once."""
    from pipelines import encode, evaluate, train  # noqa: F401 (torch, timm and Ray Data, while Ray starts)
    from pipelines.tracking import tracking_uri, unfinished_run, use_store
    from tuning import sweep  # noqa: F401
    uri = tracking_uri(run_dir)
    experiment = use_store(uri)
    return uri, experiment, unfinished_run(tags)


def print_summary(summary: dict, plan: Plan, uri: str, experiment_id: str) -> None:
    from pipelines.tracking import UI_QUERY
    print("\n=== sddit full_run summary ===")
    print(f"wall time: {summary['wall_s'] / 60:.1f} min ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stages"].items()) + ")")
    steps, wall = summary["step_seconds"], summary["wall_s"]
    print(f"training steps: {steps:.0f} s ({100 * steps / wall:.0f}% of the wall time); start-up, sweep overhead, "
          f"evaluation and the rest: {wall - steps:.0f} s")
    suffix = plan.extractor
    if "metrics_cfg1" in summary:
        fid, fid0 = summary["metrics_cfg1"][f"fid_{suffix}"], summary["metrics_untrained_cfg1"][f"fid_{suffix}"]
        print(f"FID ({suffix}, CFG 1, {plan.eval_samples} samples): {fid:.3f}  (untrained: {fid0:.3f}, "
              f"ratio {fid / fid0:.3f})")
        agreement = summary["metrics_cfg"].get(f"class_agreement_{suffix}")
        if agreement is not None:
            print(f"samples classified as the requested class (CFG {summary['cfg_scale']:g}, "
                  f"{summary['guided_samples']} samples): {100 * agreement:.1f}%")
        print(f"sample grid: {summary['samples']}")
    if "checkpoint" in summary:
        print(f"checkpoint: {summary['checkpoint']}")
    ui = f"http://127.0.0.1:5000/#/experiments/{experiment_id}"
    print(f"browse: mlflow ui --backend-store-uri {uri}\n  then open {ui}/runs?{UI_QUERY} (every run, in MLflow's "
          f"'Model training' layout)\n  or this pipeline run, its stages and sample grid: "
          f"{ui}/runs/{summary['mlflow_run_id']}?{UI_QUERY}")


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("full_run", main)
    # Ray's exit hook waits 0.5 s for workers' late log lines; the stages' output arrived long before the summary
    import ray
    ray.shutdown()


if __name__ == "__main__":
    cli()
