"""Stage 4, evaluate: sample a checkpoint's generation EMA on Ray, then FID / sFID / IS / precision / recall.

    python pipelines/evaluate.py --checkpoint runs/xl2/checkpoint-400000 \\
        --reference VIRTUAL_imagenet256_labeled.npz --inception-weights pt_inception-2015-12-05-6726825d.pth

The protocol is DiT / MaskDiT / SD-DiT's: 50,000 samples from the generation EMA, EDM Heun sampler,
classifier-free guidance on all channels, labels balanced over the classes, ADM's samples.npz,
metrics with the conventions of ADM's TensorFlow evaluator (sddit.metrics, sddit.extractors).
Other papers' conventions are options (--guidance-interval, --guidance-channels, --labels), and so
is how the network runs (--precision bf16, --compile); all of them are recorded in protocol.json
and in the MLflow run, and a non-default choice is part of the default --out name.

One sampling actor per GPU (two on a CPU-only machine) loads the generation EMA once and draws the
batches the driver hands it; the driver writes each finished batch atomically to
<out>/samples/batch-NNNNN.npz, so a rerun draws only the missing batches and, since every sample has
its own seed, ends with the same samples.npz. Features and metrics are computed on the driver, on its
GPU when it has one (on a cluster: `ray job submit --entrypoint-num-gpus 1 ...`). The checkpoint must
be readable from every node (shared storage, as the train stage writes it).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sddit import code_version
from sddit.checkpoint import load_checkpoint, load_generator, resolve
from sddit.codecs import make_codec
from sddit.evaluation import compute_metrics
from sddit.errors import ConfigError
from sddit.extractors import WEIGHTS_ENV
from sddit.reference import load_reference, make_extractor
from sddit.sampling import (LABEL_MODES, SAMPLES_DIR, EvaluationError, SamplingPlan, assemble_samples,
                            check_protocol, finished_batches, iter_sample_batches, sample_batch, sampling_network,
                            write_batch)
from pipelines.common import (Progress, init_ray, parse_options, require_at_least, run_cli, set_verbose,
                              shared_options)

DATASET_KEYS = ("dir", "codec", "vae", "latent_shape", "num_classes")


@dataclass
class EvaluateOptions:
    """What one evaluation does (the command line's flags, typed; checked here for every caller)."""
    checkpoint: str
    num_samples: int = 50_000
    steps: int = 40
    cfg_scale: float = 1.5
    reference: str | None = None
    extractor: str = "inception"
    inception_weights: str | None = None
    out: str | None = None
    batch_size: int = 64
    seed: int = 0
    guidance_interval: tuple[float, float] | None = None    # the command line's "LO,HI" is parsed here
    guidance_channels: int | None = None
    guidance_factor: float = 1.0
    label_mode: str = "balanced"
    precision: str = "fp32"
    compile: bool = False
    png: bool = False
    address: str | None = None
    run_dir: str = "runs"
    verbose: bool = False

    def __post_init__(self):
        for flag, choices in (("extractor", ("inception", "domain")), ("label_mode", tuple(sorted(LABEL_MODES))),
                              ("precision", ("fp32", "bf16"))):
            if getattr(self, flag) not in choices:
                raise ConfigError(f"--{flag.replace('_mode', 's')}", f"must be one of {', '.join(choices)}, "
                                                                     f"got {getattr(self, flag)!r}")
        require_at_least(self, num_samples=2, steps=1, batch_size=1, cfg_scale=0)
        if isinstance(self.guidance_interval, str):
            try:
                lo, hi = (float(v) for v in self.guidance_interval.split(","))
            except ValueError:
                raise ConfigError("--guidance-interval", f"expected LO,HI, e.g. 0.28,5.42, got "
                                                         f"{self.guidance_interval!r}") from None
            self.guidance_interval = (lo, hi)
        if self.guidance_interval is not None and not 0 <= self.guidance_interval[0] < self.guidance_interval[1]:
            raise ConfigError("--guidance-interval", f"needs 0 <= LO < HI, got {self.guidance_interval}")


def parse_args(argv=None) -> EvaluateOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared_options("--address", "--run-dir", "--verbose")])
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint.pt or the directory holding one; its generation EMA is sampled")
    parser.add_argument("--num-samples", type=int, default=50_000,
                        help="number of samples (default 50000, the published protocol); >= 2")
    parser.add_argument("--steps", type=int, default=40, help="EDM Heun steps (default 40; 2 * steps - 1 evaluations)")
    parser.add_argument("--cfg-scale", type=float, default=1.5,
                        help="classifier-free guidance scale on all channels; 1 = no guidance (default 1.5)")
    parser.add_argument("--reference", default=None,
                        help="what to compare against: an ADM reference batch .npz (e.g. VIRTUAL_imagenet256_labeled"
                             ".npz; its Inception statistics are used as they are with --extractor inception) or a "
                             "dataset directory of shards + manifest.json (default: the checkpoint's dataset; its "
                             "statistics are cached next to the shards)")
    parser.add_argument("--extractor", default="inception", choices=["inception", "domain"],
                        help="inception: the FID Inception-v3 (needs --inception-weights); domain: a small classifier "
                             "trained on the checkpoint's dataset, for data where ImageNet features mean nothing, "
                             "e.g. the demo digits (cached next to the shards) (default inception)")
    parser.add_argument("--inception-weights", default=None,
                        help=f"path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: ${WEIGHTS_ENV}); "
                             f"its checksum is verified, nothing is ever downloaded")
    parser.add_argument("--out", default=None,
                        help="output directory for samples/, samples.npz, metrics.json "
                             "(default <checkpoint dir>/eval-<steps>steps-cfg<scale>)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="samples per sampling call and per batch file (default 64); part of the protocol: "
                             "a rerun into the same --out must use the same value")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed; sample i is drawn from its own seed (seed, i) (default 0)")
    parser.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                        help="guide only at noise levels LO < sigma <= HI (Kynkaanniemi et al. 2024; EDM2 uses "
                             "0.28,5.42; REPA's t <= 0.7 on SiT's linear path is sigma <= 2.33) (default: every step)")
    parser.add_argument("--guidance-channels", type=int, default=None, metavar="K",
                        help="guide only the first K latent channels, the rest stay conditional (DiT's released "
                             "numbers use 3 of 4) (default: all channels)")
    parser.add_argument("--guidance-factor", type=float, default=1.0, metavar="S",
                        help="sample with the scale 1 + S (cfg_scale - 1): Berrada et al.'s law for a guidance scale "
                             "tuned at another resolution (default 1: the scale as given)")
    parser.add_argument("--labels", dest="label_mode", default="balanced", choices=sorted(LABEL_MODES),
                        help="; ".join(f"{k}: {v}" for k, v in LABEL_MODES.items()) + " (default balanced)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="the network under bf16 autocast or in fp32; the ODE state stays float64 (default fp32)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the network in each sampling actor (one compilation per actor, then "
                             "faster steps; on a GPU it needs triton); samples differ from eager ones only by "
                             "floating-point rounding (default: eager)")
    parser.add_argument("--png", action="store_true", help="also write every sample as <out>/png/NNNNNN.png")
    return parse_options(parser, EvaluateOptions, argv)


# ---------------------------------------------------------------------------------------------
# Sampling actors
# ---------------------------------------------------------------------------------------------

class SamplingActor:
    """Holds one generation EMA and the codec on its device; draws whole batches of a plan. A driver that
    evaluates several times in a row (full_run: three) can keep it for the next evaluation, which then loads
    another network only when the checkpoint or the plan changes."""

    def __init__(self, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.loaded = None

    def prepare(self, checkpoint: str, plan: dict) -> None:
        if self.loaded == (checkpoint, plan):
            return
        _, ema, dataset = load_generator(checkpoint, self.device)
        self.codec = make_codec(dataset["codec"], dataset["vae"], device=self.device)
        self.plan = SamplingPlan(**plan)
        self.network = sampling_network(ema, self.plan)
        self.loaded = (checkpoint, plan)

    def sample(self, batch_index: int):
        images, labels = sample_batch(self.network, self.codec, batch_index, self.plan, self.device)
        return batch_index, images, labels


_pool: dict = {"job": None, "actors": []}   # sampling actors kept for this driver's next evaluation


def sampling_actors(ray) -> list:
    """One actor per GPU, or two on a CPU-only cluster: the kept ones, or new ones (also after Ray was
    restarted in the same process)."""
    job = ray.get_runtime_context().get_job_id()
    if _pool["job"] != job:
        _pool.update(job=job, actors=[])
    if not _pool["actors"]:
        num_gpus = int(ray.cluster_resources().get("GPU", 0))
        if num_gpus:
            count, options = num_gpus, {"num_gpus": 1}
        else:
            count, options = min(2, max(1, int(ray.cluster_resources().get("CPU", 1)))), {"num_cpus": 1}
        actor_class = ray.remote(SamplingActor).options(**options)
        _pool["actors"] = [actor_class.remote(num_gpus > 0) for _ in range(count)]
    return _pool["actors"]


def release_sampling_actors() -> None:
    """Stop the kept sampling actors: they hold CPUs or GPUs that later stages of the driver need."""
    import ray
    if _pool["actors"] and ray.is_initialized() and _pool["job"] == ray.get_runtime_context().get_job_id():
        for actor in _pool["actors"]:
            ray.kill(actor)
    _pool["actors"] = []


def sample_on_ray(args, checkpoint: Path, plan: SamplingPlan, out: Path, todo: list[int], keep_actors: bool) -> None:
    """Draw the `todo` batches on actors; the driver writes each result as it arrives. The actors are stopped
    at the end unless `keep_actors`."""
    ray = init_ray(args.address)
    actors = sampling_actors(ray)[:len(todo)]
    on_gpu = bool(ray.cluster_resources().get("GPU", 0))
    print(f"evaluate: sampling {len(todo)} of {plan.num_batches} batches on {len(actors)} "
          f"{'GPU' if on_gpu else 'CPU'} actor(s)", flush=True)
    queue, pending = list(todo), {}

    def submit(actor):
        if queue:
            pending[actor.sample.remote(queue.pop(0))] = actor

    progress = Progress(sum(len(plan.batch_indices(b)) for b in todo), "evaluate: sampling")
    try:
        ray.get([actor.prepare.remote(str(checkpoint), plan.to_dict()) for actor in actors])
        for actor in actors:
            for _ in range(2):                  # one batch in flight while the previous one comes back
                submit(actor)
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ready)
            batch_index, images, labels = ray.get(ready)
            write_batch(out, batch_index, images, labels)
            progress.update(len(images))
            submit(actor)
    except BaseException:                   # an actor in an unknown state is not kept for the next evaluation
        keep_actors = False
        raise
    finally:
        progress.close()
        if not keep_actors:
            release_sampling_actors()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def default_out(checkpoint: Path, plan: SamplingPlan) -> Path:
    """<checkpoint dir>/eval-<steps>steps-cfg<scale>, plus a part for each non-default sampling option."""
    parts = [f"eval-{plan.steps}steps-cfg{plan.cfg_scale:g}"]
    if plan.guidance_interval is not None:
        parts.append("interval{:g}-{:g}".format(*plan.guidance_interval))
    if plan.guidance_channels is not None:
        parts.append(f"ch{plan.guidance_channels}")
    if plan.guidance_factor != 1.0:
        parts.append(f"gf{plan.guidance_factor:g}")
    if plan.label_mode != "balanced":
        parts.append(f"labels-{plan.label_mode}")
    if plan.precision != "fp32":
        parts.append(plan.precision)
    if plan.compile:
        parts.append("compiled")
    return checkpoint.parent / "-".join(parts)


def write_pngs(out: Path, plan: SamplingPlan) -> Path:
    from PIL import Image
    folder = out / "png"
    folder.mkdir(exist_ok=True)
    index = 0
    for images, _ in iter_sample_batches(out, plan):
        for image in images:
            path = folder / f"{index:06d}.png"
            if not path.exists():
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
            index += 1
    return folder


def evaluate(args: EvaluateOptions, keep_actors: bool = False) -> tuple[dict[str, float], Path]:
    """(metrics, the output directory) of one evaluation. `keep_actors`: leave the sampling actors up for the
    caller's next evaluation (then call `release_sampling_actors` when done)."""
    started = time.time()
    set_verbose(args.verbose)
    checkpoint = resolve(args.checkpoint).resolve()
    payload = load_checkpoint(checkpoint)
    config, step, dataset = payload["config"], payload["step"], payload.get("dataset") or {}
    del payload
    missing = [key for key in DATASET_KEYS if key not in dataset]
    if missing:
        raise EvaluationError(f"{checkpoint}: its dataset record lacks {missing}; was it written by the train stage?")
    plan = SamplingPlan(args.num_samples, args.batch_size, config.model.num_classes, dataset["latent_shape"],
                        steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, label_mode=args.label_mode,
                        guidance_interval=args.guidance_interval, guidance_channels=args.guidance_channels,
                        guidance_factor=args.guidance_factor, precision=args.precision, compile=args.compile)
    model_shape = [config.model.in_channels, config.model.input_size, config.model.input_size]
    if list(plan.latent_shape) != model_shape:
        raise EvaluationError(f"{checkpoint}: dataset latent_shape {list(plan.latent_shape)} does not match the "
                              f"model's [in_channels, input_size, input_size] = {model_shape}")
    out = Path(args.out) if args.out else default_out(checkpoint, plan)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # everything that can fail without a GPU fails here, before any sampling
    codec = make_codec(dataset["codec"], dataset["vae"], device=device)
    extractor = make_extractor(args.extractor, dataset_dir=dataset["dir"], codec=codec,
                               inception_weights=args.inception_weights, device="cpu")
    protocol = {"checkpoint": str(checkpoint), "checkpoint_step": int(step), **plan.to_dict()}
    check_protocol(out, protocol)

    done = finished_batches(out, plan)
    todo = [b for b in range(plan.num_batches) if b not in done]
    start = time.time()
    if todo:
        sample_on_ray(args, checkpoint, plan, out, todo, keep_actors)
    else:
        print(f"evaluate: all {plan.num_batches} batches already in {out / SAMPLES_DIR}", flush=True)
    sampling_seconds = time.time() - start
    npz = assemble_samples(out, plan)

    extractor.to(device)
    reference = load_reference(args.reference, extractor, dataset_dir=dataset["dir"], codec=codec, device=device)
    labels = None if plan.num_classes == 0 else np.concatenate([y for _, y in iter_sample_batches(out, plan)])
    metrics = compute_metrics(extractor, (images for images, _ in iter_sample_batches(out, plan)), reference, labels)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if args.png:
        print(f"evaluate: PNGs in {write_pngs(out, plan)}", flush=True)

    params = {
        **protocol,
        "model": config.model.name,
        "sampler": "EDM Heun (2nd order, no churn)",
        "cfg_channels": "all" if plan.guidance_channels is None else f"first {plan.guidance_channels}",
        "cfg_interval": "every step" if plan.guidance_interval is None else "{:g} < sigma <= {:g}".format(
            *plan.guidance_interval),
        "weights": "generation EMA",
        "labels": LABEL_MODES[plan.label_mode] if plan.num_classes else "unconditional",
        "seeds": f"per sample: SeedSequence([{plan.seed}, i])",
        "reference": reference.source,
        "extractor": extractor.name,
        "extractor_weights_sha256": extractor.weights_checksum,
        "samples_npz": str(npz.resolve()),
        "code_version": code_version(),
    }
    if hasattr(extractor, "accuracy"):
        params["extractor_heldout_accuracy"] = extractor.accuracy
    sampled_images = sum(len(plan.batch_indices(b)) for b in todo)
    if sampled_images:                      # how fast this run sampled (start-up and compilation included)
        (out / "sampling.json").write_text(json.dumps(
            {"images": sampled_images, "seconds": sampling_seconds, "images_per_s": sampled_images / sampling_seconds,
             "precision": plan.precision, "compile": plan.compile}, indent=2))
    log_run(args, params, metrics, out, plan, step=int(step), sampled_images=sampled_images, seconds=sampling_seconds,
            started=started)
    print("evaluate: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) + f" (in {out / 'metrics.json'})",
          flush=True)
    return metrics, out


def log_run(args, params: dict, metrics: dict, out: Path, plan: SamplingPlan, *, step: int, sampled_images: int,
            seconds: float, started: float) -> None:
    """The stage's MLflow run: the exact protocol as params, metrics at the checkpoint's training step, a grid."""
    import mlflow

    from pipelines.tracking import stage_run
    from sddit.codecs import images_to_unit
    from sddit.images import grid_image
    # sample i has label i mod K, so with K columns each column shows one class
    nrow = plan.num_classes if 2 <= plan.num_classes <= 16 else 8
    first = []
    for images, _ in iter_sample_batches(out, plan):
        first.append(images)
        if sum(map(len, first)) >= 8 * nrow:
            break
    first = np.concatenate(first)[:8 * nrow]
    with stage_run("evaluate", args.run_dir, params=params, started=started):
        mlflow.log_metrics(metrics, step=step)
        if sampled_images:                  # a rerun that only recomputes metrics has no sampling speed
            mlflow.log_metric("sampling_images_per_s", sampled_images / max(seconds, 1e-9))
        grid = grid_image(images_to_unit(first), nrow=nrow, scale=max(1, 128 // first.shape[1]))
        grid.save(out / "samples_grid.png")
        mlflow.log_image(grid, artifact_file="samples_grid.png")
        mlflow.log_artifact(str(out / "metrics.json"))


def main(argv=None) -> dict[str, float]:
    return evaluate(parse_args(argv))[0]


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("evaluate", main)


if __name__ == "__main__":
    cli()
