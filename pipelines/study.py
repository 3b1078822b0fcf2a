"""The paper's comparisons as one command: arms x seeds at equal images seen, FID along the way, a verdict.

    python pipelines/study.py --study paper-fig3 --data runs/data/fmnist-pixel16/train \\
        --reference runs/data/fmnist-pixel16/test --seeds 3 --images-per-arm 48000 --eval-points 4 \\
        --eval-samples 500 --out runs/studies/fig3

A study is a list of arms that differ only in the fields the paper varies; every arm trains the same
base config (--preset, --set) for the same number of images, once per seed. Each arm x seed is a
Ray Train run inside one Ray Tune grid (no early stopping, trials side by side as resources allow),
built on the trial machinery it shares with the sweep (pipelines/trials.py). At --eval-points
evenly spaced points each run samples its generation EMA without guidance (CFG 1, as the paper's
tables) and is scored with the domain extractor (pixel datasets) or Inception: FID, sFID, IS,
precision, recall, class agreement, beside the training losses and the discriminative diagnostics
(target entropy, agreement).

Output in --out and in one MLflow parent run with a child per trial: results.csv (a row per arm,
seed and evaluation point), summary.md (mean and standard deviation over seeds, and which
differences exceed the seed spread), fid_vs_images.png and fid_vs_wallclock.png. Rerunning the
same command continues: finished runs are not repeated, an interrupted one resumes from its last
checkpoint, a failed one is listed with its error (and retried on the next rerun) while the others
finish.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import yaml

from sddit.config import apply_overrides, load_preset, preset_names
from sddit.data import DataError, Manifest
from sddit.errors import ConfigError
from sddit.models.registry import SWITCHES, family_overrides, parse_name
from sddit.training import fit_to_dataset
from pipelines.common import run_cli, set_verbose, shared_options, warn_about_layout
from pipelines.tracking import tag_query

# ---------------------------------------------------------------------------------------------
# Arms and studies
# ---------------------------------------------------------------------------------------------

# An arm is a family, every switch of it set explicitly (sddit.models.registry.family_overrides), so it means the
# same whatever the base preset's family; backbone, decoder size, head, optimiser and schedules come from the base
# config and are shared. Then the arm's own overrides.
ARMS: dict[str, tuple[str, list[str]]] = {       # arm -> (family, overrides on top of the family's)
    "DiT": ("DiT", []),
    "MaskDiT": ("MaskDiT", []),
    "SD-DiT": ("SD-DiT", []),
    "SD-DiT-no-disc": ("SD-DiT", ["model.disc_weight=0", "model.cls_token=false"]),
    "SD-DiT-no-mask": ("SD-DiT", ["model.mask_ratio=0"]),
    **{f"SD-DiT-mask{r}": ("SD-DiT", [f"model.mask_ratio={r}"]) for r in ("0.1", "0.3", "0.5")},
    **{f"SD-DiT-tsigma{s}": ("SD-DiT", [f"diffusion.teacher_sigma={s}"]) for s in ("0.05", "0.3", "1.0")},
    "SD-DiT-tsigma-student": ("SD-DiT", ["diffusion.teacher_sigma_dist=student"]),
    # DINO / iBOT's usual teacher temperatures and the paper's (student 0.1 in both), each set explicitly
    "SD-DiT-dino-temps": ("SD-DiT", ["disc.teacher_temp_start=0.04", "disc.teacher_temp_end=0.07"]),
    "SD-DiT-paper-temps": ("SD-DiT", ["disc.teacher_temp_start=0.09", "disc.teacher_temp_end=0.099"]),
    # how the CLS passes the adaLN-Zero gates (model.cls_gate) and whether the teacher sees the label, set
    # explicitly so each arm means the same whatever the base preset chooses
    "SD-DiT-zero-cls": ("SD-DiT", ["model.cls_gate=zero"]),
    "SD-DiT-open-cls": ("SD-DiT", ["model.cls_gate=open"]),
    "SD-DiT-teacher-label": ("SD-DiT", ["disc.teacher_label=true"]),
    "SD-DiT-teacher-null-label": ("SD-DiT", ["disc.teacher_label=false"]),
    # one of the two discriminative terms at a time (the paper only removes both together)
    "SD-DiT-no-cls": ("SD-DiT", ["disc.cls_weight=0"]),
    "SD-DiT-no-patch": ("SD-DiT", ["disc.patch_weight=0"]),
    # REPA (Yu et al. 2025) on each family: lambda = 0.5; the tap depth, projector and external encoder come from
    # the base preset, the features from the dataset (pipelines/encode.py --repa-encoder)
    **{f"{family}-REPA": (family, ["model.repa_weight=0.5"]) for family in ("DiT", "MaskDiT", "SD-DiT")},
    # MaskDM's block-wise masks (b x b patches) at each family's own mask ratio
    **{f"{family}-block{b}": (family, [f"model.mask_block_size={b}"]) for family in ("MaskDiT", "SD-DiT")
       for b in (2, 4)},
    # MaskDM (Lei et al. 2023): masked score matching (the loss on visible patches only, no MAE term) at mask
    # ratio 0.5 for the first 3/4 of the images, then the full denoising loss without masks; its mask types
    **{f"MaskDM{kind}": ("MaskDiT", ["model.mae_weight=0", "train.unmasked_fraction=0.25", *extra])
       for kind, extra in (("", []), ("-block2", ["model.mask_block_size=2"]), ("-crop", ["model.mask_crop=true"]))},
    # resolution transfer (Berrada et al. 2024): the family's config at the study's resolution, initialised from
    # a pre-training run of the same family on --pretrain-data (a lower resolution), positions resampled
    **{f"{family}-transfer": (family, []) for family in ("DiT", "SD-DiT")},
    # self-supervision inside the DiT from its own forward, at each reference's weight and (scaled) blocks
    "DiT-LayerSync": ("DiT", ["model.layersync_weight=0.2"]),
    "DiT-Dispersive": ("DiT", ["model.dispersive_weight=0.25"]),
}
TRANSFERRED = {arm for arm in ARMS if arm.endswith("-transfer")}
STUDIES = {
    "paper-fig3": ["DiT", "MaskDiT", "SD-DiT"],
    "paper-tab3": ["SD-DiT", "SD-DiT-no-disc", "SD-DiT-no-mask"],
    "paper-fig5": ["SD-DiT-no-mask", "SD-DiT-mask0.1", "SD-DiT", "SD-DiT-mask0.3", "SD-DiT-mask0.5"],
    "paper-fig6": ["SD-DiT", "SD-DiT-tsigma0.05", "SD-DiT-tsigma0.3", "SD-DiT-tsigma1.0", "SD-DiT-tsigma-student"],
    "temperatures": ["SD-DiT-paper-temps", "SD-DiT-dino-temps"],
    "disc-terms": ["SD-DiT", "SD-DiT-no-cls", "SD-DiT-no-patch", "SD-DiT-no-disc"],
    "repa": ["DiT", "DiT-REPA", "SD-DiT", "SD-DiT-REPA"],
    "cls-signal": ["DiT", "MaskDiT", "SD-DiT", "SD-DiT-teacher-null-label", "SD-DiT-no-cls", "SD-DiT-no-disc",
                   "SD-DiT-zero-cls"],
    "mask-blocks": ["MaskDiT", "MaskDiT-block2", "MaskDiT-block4", "SD-DiT", "SD-DiT-block2", "SD-DiT-block4"],
    "maskdm": ["DiT", "MaskDM", "MaskDM-block2", "MaskDM-crop"],
    "transfer": ["DiT", "DiT-transfer", "SD-DiT", "SD-DiT-transfer"],
    "self-supervision": ["DiT", "SD-DiT", "SD-DiT-no-disc", "DiT-LayerSync", "DiT-Dispersive"],
}
# the paper's figures for each study (ImageNet-256, S/2 at 400k steps unless noted), quoted in summary.md
PAPER = {
    "paper-fig3": "DiT-S/2 FID 68.40 at 5.03 steps/s, MDT-S/2 53.46, SD-DiT-S/2 48.39 at 9.2 steps/s (8 A100, batch 256)",
    "paper-tab3": "SD-DiT 53.72, w/o discriminative loss 62.84, w/o mask 58.92",
    "paper-fig5": "best FID at mask ratio 0.2",
    "paper-fig6": "FID 53.7 at teacher sigma 0.002, 66.2 near the student distribution's mode, 63.4 drawn from it",
    "temperatures": "the paper uses student 0.1, teacher 0.09 -> 0.099 (Tab. 4); DINO/iBOT use teacher 0.04 -> 0.07",
    "cls-signal": "SD-DiT-S/2 53.72 against DiT-S/2 68.40 (Fig. 3, Tab. 3); the paper does not say how its CLS "
                  "passes the adaLN-Zero gates or which label its teacher sees",
    "disc-terms": "not in the paper, which removes the CLS and patch terms only together (Tab. 3: 53.72 -> 62.84)",
    "repa": "REPA (Yu et al. 2025): SiT-XL/2 with REPA reaches the FID of SiT-XL/2 at 7M steps in under 400k "
            "(17.5x fewer); REPA has not been combined with SD-DiT in the literature",
    "mask-blocks": "MaskDM (Lei et al. 2023): block-wise masks best overall among its mask types; larger blocks "
                   "better at low mask ratios, smaller ones at high ratios",
    "maskdm": "MaskDM (Lei et al. 2023): masked pre-training then fine-tuning reaches a from-scratch model's FID with "
              "about 4x fewer fine-tuning steps; block-wise masks best among its mask types",
    "transfer": "Berrada et al. (2024): pre-training at low resolution, then transferring, gives about 25% better "
                "FID than training at the high resolution alone, at equal high-resolution steps",
    "self-supervision": "LayerSync (Haghighi et al. 2025): SiT-XL/2, 80 epochs, no CFG, FID 17.97 -> 11.24; "
                        "Dispersive Loss (Wang & He 2025): consistent FID gains on SiT and DiT of every size",
}
METRICS = ("fid", "sfid", "is", "precision", "recall", "class_agreement")
LOSSES = ("loss_gen", "loss_mae", "loss_cls", "loss_patch", "loss_repa", "target_entropy_cls", "target_entropy_patch",
          "agreement_cls", "agreement_patch", "teacher_cls_token_std", "teacher_cls_logit_std", "loss_layersync",
          "loss_dispersive")


def arm_overrides(arm: str, base_name: str, custom: dict | None = None) -> list[str]:
    """The overrides that turn the base config into `arm` (its model named after the family, size kept)."""
    custom = custom or {}
    if arm in custom:
        family, extra = custom[arm]
    elif arm in ARMS:
        family, extra = ARMS[arm]
    else:
        raise ConfigError("arms", f"unknown arm {arm!r}; built-in arms: {', '.join(ARMS)}"
                                  + (f"; from --arms-file: {', '.join(custom)}" if custom else ""))
    _, size, patch = parse_name(base_name)
    return [f"model.name={family}-{size}/{patch}", *family_overrides(family), *extra]


def load_arms_file(path) -> dict[str, tuple[str, list[str]]]:
    """{NAME: {family: DiT|MaskDiT|SD-DiT, set: [SECTION.FIELD=VALUE, ...]}}: a user's own arms."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("arms_file", f"no such file: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    arms = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or spec.get("family") not in SWITCHES:
            raise ConfigError(f"arms_file.{name}", f"{path}: needs family: {' | '.join(SWITCHES)}")
        arms[str(name)] = (spec["family"], [str(item) for item in spec.get("set") or []])
    return arms


# ---------------------------------------------------------------------------------------------
# Command line and plan
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    shared = shared_options("--set", "--use-gpu", "--run-dir", "--storage", "--address", "--verbose",
                            set="overrides of the base config, applied to every arm (before the arm's own)",
                            use_gpu="one GPU per run (default: CPU)")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[shared])
    parser.add_argument("--study", default=None, choices=sorted(STUDIES),
                        help="a built-in study: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in STUDIES.items()))
    parser.add_argument("--arms", default=None,
                        help="comma-separated arms instead of (or to name) a study's; built-in arms: " + ", ".join(ARMS))
    parser.add_argument("--arms-file", default=None,
                        help="YAML of your own arms: {NAME: {family: DiT|MaskDiT|SD-DiT, set: [SECTION.FIELD=VALUE]}}")
    parser.add_argument("--name", default=None, help="study name (default: --study, else 'custom'); a rerun needs the same")
    parser.add_argument("--data", required=True, help="training dataset written by pipelines/encode.py")
    parser.add_argument("--reference", default=None,
                        help="held-out dataset (written by pipelines/encode.py at the same resolution) that the FID "
                             "judge is trained on and the reference statistics come from (default: --data itself)")
    parser.add_argument("--pretrain-data", default=None,
                        help="dataset at a lower resolution (same codec) for the -transfer arms' pre-training runs")
    parser.add_argument("--pretrain-images", type=int, default=None,
                        help="images each -transfer arm pre-trains on at --pretrain-data's resolution (default: "
                             "--images-per-arm); the cost is reported beside the results, not subtracted from them")
    parser.add_argument("--preset", default=None,
                        help=f"base config every arm shares: backbone, batch, lr ({', '.join(preset_names())} or a "
                             f"YAML path; default fashion-mnist for pixel datasets, imagenet256-S2 for SD-VAE latents)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm, 0..N-1 (train.seed; default 3)")
    parser.add_argument("--images-per-arm", type=int, default=48_000,
                        help="training images per run (rounded up to whole evaluation intervals; default 48000)")
    parser.add_argument("--eval-points", type=int, default=4, help="evenly spaced evaluation points per run (default 4)")
    parser.add_argument("--eval-samples", type=int, default=500, help="samples per evaluation (default 500)")
    parser.add_argument("--eval-heun-steps", type=int, default=12,
                        help="EDM Heun steps per evaluation sample (default 12; 2 * steps - 1 network evaluations)")
    parser.add_argument("--out", required=True, help="output folder: results.csv, summary.md, plots, trials/")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report of the runs recorded so far (a study stopped part-way; "
                             "unfinished runs are listed as such and continue on a later rerun without this flag)")
    parser.add_argument("--max-concurrent", type=int, default=None, help="runs at once (default: what the cluster fits)")
    args = parser.parse_args(argv)
    for flag in ("seeds", "images_per_arm", "eval_points", "eval_samples", "eval_heun_steps", "pretrain_images"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.eval_samples < 2:
        parser.error("--eval-samples must be >= 2 (FID needs a covariance)")
    if not args.study and not args.arms:
        parser.error("give --study NAME or --arms A,B,...")
    args.name = args.name or args.study or "custom"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    return args


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text)


def plan_study(args) -> dict:
    """Everything about the study, checked before Ray starts: the arms' configs, the schedule, the runs."""
    manifest = Manifest.read(args.data)
    warn_about_layout("study", manifest, args.data)
    custom = load_arms_file(args.arms_file) if args.arms_file else {}
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else STUDIES[args.study]
    if len(set(arms)) != len(arms):
        raise ConfigError("arms", f"an arm is listed twice: {arms}")
    codec = manifest.settings.codec
    preset_name = args.preset or ("fashion-mnist" if codec == "pixel" else "imagenet256-S2")
    preset = apply_overrides(load_preset(preset_name), [f"data.codec={codec}",
                                                        f"data.resolution={manifest.settings.resolution}"])
    base = fit_to_dataset(apply_overrides(preset, list(args.overrides)), manifest, args.data)
    # equal images seen: whole evaluation intervals of whole batches
    batch = base.optim.batch_size
    every = max(math.ceil(args.images_per_arm / batch / args.eval_points), 1)
    steps = every * args.eval_points
    schedule = [f"train.steps={steps}", f"train.log_every={every}", f"train.checkpoint_every={every}",
                f"train.sample_every={steps}"]
    base = apply_overrides(base, schedule)
    if args.reference:
        held_out = Manifest.read(args.reference)
        if held_out.latent_shape != manifest.latent_shape or held_out.settings.codec != codec:
            raise DataError(f"{Path(args.reference) / 'manifest.json'}: codec {held_out.settings.codec} and shape "
                            f"{held_out.latent_shape} differ from the training data's {codec} {manifest.latent_shape}")
    pretrain_runs, pretrain = {}, plan_pretraining(args, arms, base, manifest)
    runs = {}
    for arm in arms:
        overrides = arm_overrides(arm, base.model.name, custom)
        for seed in range(args.seeds):
            label = f"{arm}@seed{seed}"
            origin = {}
            if arm in TRANSFERRED:
                pretrain_runs[label] = pretraining_run(args, arm, seed, base, overrides, pretrain)
                origin = {"pretrain": label, "pretrain_name": pretrain_runs[label]["name"]}
            # an arm that cannot be built, or that this dataset cannot feed (REPA without features), fails here
            try:
                config = fit_to_dataset(apply_overrides(base, overrides + [f"train.seed={seed}"]), manifest, args.data)
            except DataError as error:
                raise DataError(f"arm {arm}: {error}") from error
            # the run's name carries its config's digest: a rerun continues a run only if nothing about it
            # changed; with other settings under the same --name it starts new runs instead of mixing them
            digest = hashlib.sha256(json.dumps({**config.flat(), **origin}, sort_keys=True,
                                               default=str).encode()).hexdigest()[:8]
            runs[label] = {"arm": arm, "seed": seed, "overrides": overrides + [f"train.seed={seed}"],
                           "name": f"study-{args.name}-{slug(arm)}-seed{seed}-{digest}",
                           "params": {"study.name": args.name, "study.arm": arm, "study.seed": seed}, **origin}
    extractor = "domain" if codec == "pixel" else "inception"
    return {"name": args.name, "arms": arms, "base": base, "preset": preset_name, "steps": steps, "every": every,
            "images": steps * batch, "extractor": extractor, "runs": runs, "pretrain_runs": pretrain_runs,
            "pretrain": pretrain, "judge_dir": str(Path(args.reference or args.data).resolve())}


def plan_pretraining(args, arms: list[str], base, manifest) -> dict | None:
    """The transfer arms' pre-training schedule on --pretrain-data: {resolution, steps, images, data}, or None."""
    if not TRANSFERRED & set(arms):
        return None
    if not args.pretrain_data:
        raise ConfigError("pretrain_data", f"arms {sorted(TRANSFERRED & set(arms))} pre-train on a lower-resolution "
                                           f"dataset: give --pretrain-data (pipelines/encode.py --resolution R)")
    low = Manifest.read(args.pretrain_data)
    where = Path(args.pretrain_data) / "manifest.json"
    if low.settings.codec != manifest.settings.codec or low.latent_shape[0] != manifest.latent_shape[0]:
        raise DataError(f"{where}: codec {low.settings.codec} with {low.latent_shape[0]} channels; the training "
                        f"data's is {manifest.settings.codec} with {manifest.latent_shape[0]}")
    if low.settings.resolution == manifest.settings.resolution:
        raise DataError(f"{where}: the same resolution as --data ({low.settings.resolution}); nothing to transfer")
    steps = math.ceil((args.pretrain_images or args.images_per_arm) / base.optim.batch_size)
    return {"resolution": low.settings.resolution, "steps": steps, "images": steps * base.optim.batch_size,
            "data": str(Path(args.pretrain_data).resolve())}


def pretraining_run(args, arm: str, seed: int, base, overrides: list[str], pretrain: dict) -> dict:
    """The run a transfer arm starts from: its family at the pre-training resolution, without evaluations
    (the judge and the reference are the study's resolution's), one checkpoint at the end."""
    schedule = [f"data.resolution={pretrain['resolution']}", f"train.steps={pretrain['steps']}",
                f"train.log_every={max(pretrain['steps'] // 4, 1)}", f"train.checkpoint_every={pretrain['steps']}",
                f"train.sample_every={pretrain['steps']}", f"train.seed={seed}"]
    config = apply_overrides(base, overrides + schedule).flat()
    digest = hashlib.sha256(json.dumps({**config, "data": pretrain["data"]}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:8]
    return {"arm": arm, "seed": seed, "overrides": overrides + schedule, "data": pretrain["data"], "proxy": None,
            "steps": pretrain["steps"], "name": f"study-{args.name}-{slug(arm)}-pretrain-seed{seed}-{digest}",
            "params": {"study.name": args.name, "study.arm": arm, "study.seed": seed, "study.stage": "pretrain"}}


def final_checkpoint(storage: Path, run: dict) -> Path | None:
    """The checkpoint a finished pre-training run left in its Ray Train storage, or None."""
    from sddit.checkpoint import load_checkpoint
    found = sorted((storage / run["name"]).glob("checkpoint_*/checkpoint.pt"))
    if found and load_checkpoint(found[-1].parent)["step"] >= run["steps"]:
        return found[-1].parent
    return None


# ---------------------------------------------------------------------------------------------
# Running the grid
# ---------------------------------------------------------------------------------------------

def storage_of(args) -> Path:
    return Path(args.storage or Path(args.run_dir) / "ray").resolve()


def run_grid(args, plan: dict, todo: list[str], parent_run_id: str, uri: str, runs: dict | None = None,
             what: str = "runs") -> dict[str, str]:
    """The runs in `todo` (of `runs`, default the study's) as one Tune grid of Ray Train runs; -> {label: error}
    of the runs that failed."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from pipelines.common import init_ray, tune_verbosity
    from pipelines.tracking import use_store
    from pipelines.trials import root_cause, trial_resources, trial_runs_callback, trial_trainable

    runs = plan["runs"] if runs is None else runs
    storage = storage_of(args)
    ray = init_ray(args.address)
    concurrent, cpus_per_worker, gpus_per_worker = trial_resources(
        ray, 1, 1 if args.use_gpu else 0, args.max_concurrent)
    context = {
        "base_config": plan["base"].to_dict(), "data": str(Path(args.data).resolve()),
        "runs": {label: runs[label] for label in todo}, "sweep_run_id": parent_run_id, "mlflow_uri": uri,
        "experiment_id": use_store(uri).experiment_id,
        "storage": str(storage), "workers": 1, "cpus_per_worker": cpus_per_worker,
        "gpus_per_worker": gpus_per_worker,
        "proxy": {"every": plan["every"], "num_samples": args.eval_samples, "heun_steps": args.eval_heun_steps,
                  "extractor": plan["extractor"], "reference": plan["judge_dir"]},
    }
    steps = runs[todo[0]].get("steps", plan["steps"])
    print(f"study {plan['name']}: {len(todo)} {what} of {steps} steps ({steps * plan['base'].optim.batch_size} images), "
          f"{concurrent} at a time with {cpus_per_worker} CPU(s) each", flush=True)
    tuner = tune.Tuner(
        trial_trainable(context),
        param_space={"run": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(search_alg=BasicVariantGenerator(max_concurrent=concurrent)),
        # a new Tune experiment per invocation; the Train runs inside keep their names and so their checkpoints
        run_config=tune.RunConfig(name=f"study-{plan['name']}-{what}-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=str(storage), verbose=tune_verbosity(),
                                  callbacks=[trial_runs_callback(context)],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    errors = {}
    for result in tuner.fit():
        label = (result.config or {}).get("run")
        if label is not None and result.error:
            errors[label] = root_cause(result.error)
    return errors


def evaluated_steps(client, plan: dict) -> dict[str, tuple[str | None, list[int]]]:
    """{label: (MLflow run id or None, steps evaluated)}: what each run has done, from its own history, so a
    killed study loses nothing and a rerun knows which runs are finished."""
    from pipelines.tracking import EXPERIMENT
    experiment = client.get_experiment_by_name(EXPERIMENT)
    key = f"proxy_fid_{plan['extractor']}"
    done = {}
    for label, run in plan["runs"].items():
        found = client.search_runs([experiment.experiment_id], tag_query({"sddit.train_name": run["name"]})) \
            if experiment else []
        run_id = found[0].info.run_id if found else None
        done[label] = (run_id, sorted(m.step for m in client.get_metric_history(run_id, key)) if run_id else [])
    return done


def outcomes_of(done: dict, plan: dict, errors: dict[str, str]) -> dict[str, dict]:
    outcomes = {}
    for label, (_, steps) in done.items():
        last = max(steps, default=0)
        if last >= plan["steps"]:
            outcomes[label] = {"status": "completed", "last_step": last}
        elif label in errors:
            outcomes[label] = {"status": "error", "error": errors[label], "last_step": last}
        else:
            outcomes[label] = {"status": "incomplete", "last_step": last}
    return outcomes


# ---------------------------------------------------------------------------------------------
# Results: CSV, summary, plots
# ---------------------------------------------------------------------------------------------

def collect_rows(client, run_id: str, run: dict, plan: dict) -> list[dict]:
    """A row per evaluation point of one run, from its MLflow metric history (complete across restarts)."""
    suffix = plan["extractor"]
    keys = {f"proxy_{m}_{suffix}": m for m in METRICS} | {k: k for k in LOSSES} | {"images_per_s": "images_per_s"}
    history = {name: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key, name in keys.items()}
    batch = plan["base"].optim.batch_size
    rows, train_seconds = [], 0.0
    for step in sorted(history["fid"]):
        # the loop's img/s excludes evaluation time, so this is the training wall clock
        train_seconds += plan["every"] * batch / max(history["images_per_s"].get(step, float("nan")), 1e-9)
        row = {"study": plan["name"], "arm": run["arm"], "seed": run["seed"], "step": step,
               "images_seen": step * batch, "train_seconds": round(train_seconds, 2)}
        row.update({name: values.get(step, "") for name, values in history.items()})
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = ["study", "arm", "seed", "step", "images_seen", "train_seconds", *METRICS, *LOSSES, "images_per_s"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: list[dict], arms: list[str]) -> dict:
    """{arm: {images_seen: {column: (mean, std, n)}}} over seeds."""
    out = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        out[arm] = {}
        for images in sorted({r["images_seen"] for r in mine}):
            at = [r for r in mine if r["images_seen"] == images]
            stats = {}
            for column in ("train_seconds", *METRICS, *LOSSES, "images_per_s"):
                values = np.array([float(r[column]) for r in at if r[column] != ""], dtype=float)
                if len(values):
                    stats[column] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                                     len(values))
            out[arm][images] = stats
    return out


def exceeds_spread(a: tuple, b: tuple) -> bool:
    """Whether two arms' means differ by more than twice the standard error of the difference over seeds."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return False
    return abs(ma - mb) > 2 * math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def fmt(stat: tuple | None, digits: int = 2) -> str:
    return "n/a" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def arms_without_cls_signal(rows: list[dict], arms: list[str], num_prototypes: int) -> list[str]:
    """The arms with a CLS term whose every recorded CLS target entropy (every seed, every point) is ln K."""
    from sddit.diagnostics import cls_carries_no_signal
    return [arm for arm in arms if cls_carries_no_signal(
        [r["target_entropy_cls"] for r in rows if r["arm"] == arm and r["target_entropy_cls"] != ""], num_prototypes)]


def write_summary(path: Path, plan: dict, args, agg: dict, outcomes: dict, flat_cls: list[str] = ()) -> None:
    """`flat_cls`: arms flagged by arms_without_cls_signal."""
    from sddit.diagnostics import NO_SIGNAL_TOLERANCE
    arms, suffix = plan["arms"], plan["extractor"]
    lines = [f"# Study `{plan['name']}`", "",
             f"Arms: {', '.join(arms)}; seeds 0..{args.seeds - 1}; {plan['images']} images per run "
             f"({plan['steps']} steps at batch {plan['base'].optim.batch_size}); evaluated every {plan['every']} "
             f"steps on {args.eval_samples} samples, {args.eval_heun_steps} Heun steps, CFG 1, {suffix} extractor "
             f"(judge and reference: {args.reference or args.data}). Base preset `{plan['preset']}`"
             + (f" with {' '.join(args.overrides)}" if args.overrides else "") + f"; data {args.data} at "
             f"{plan['base'].data.resolution} px, {plan['base'].model.input_size ** 2 // plan['base'].model.patch_size ** 2}"
             f" tokens. Values are mean ± standard deviation over seeds.", ""]
    judge = plan.get("judge") or {}
    if "weights_sha256" in judge:
        lines += [f"Judge: the domain classifier with weights sha256 `{judge['weights_sha256'][:12]}`, held-out "
                  f"accuracy {judge['held_out_accuracy']:.3f}. FIDs compare only with runs scored by this judge "
                  f"(the same checksum): a judge trained on the same images in another order scales FID otherwise.",
                  ""]
    if plan["name"] in PAPER:
        lines += [f"Paper: {PAPER[plan['name']]}.", ""]
    if plan["pretrain"]:
        pre = plan["pretrain"]
        lines += [f"The -transfer arms start from a run of their family at {pre['resolution']} px ({pre['images']} "
                  f"images, {pre['steps']} steps, on {args.pretrain_data}), its position table resampled onto the "
                  f"{plan['base'].data.resolution} px grid; that pre-training is extra compute, not in 'images seen'.",
                  ""]
    failed = {label: o for label, o in outcomes.items() if o["status"] != "completed"}
    if failed:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- `{label}`: {o['status']} at step {o['last_step']}" + (f": {o['error']}" if o.get("error") else "")
                  for label, o in sorted(failed.items())]
        lines += [""]
    lines += [f"## FID ({suffix}) vs images seen", "", "| images | " + " | ".join(arms) + " |",
              "| --- |" + " --- |" * len(arms)]
    points = sorted({images for arm in arms for images in agg[arm]})
    for images in points:
        lines.append(f"| {images} | " + " | ".join(fmt(agg[arm].get(images, {}).get("fid")) for arm in arms) + " |")
    final = {arm: agg[arm][max(agg[arm])] for arm in arms if agg[arm]}
    lines += ["", f"## At the last point ({max(points) if points else 0} images)", "",
              "| arm | seeds | FID | sFID | precision | recall | class agreement | loss_gen | loss_cls (ln K = "
              f"{math.log(plan['base'].model.head_out_size):.3f}) | target entropy CLS | teacher CLS token std | "
              "teacher CLS logit std | loss_patch | target entropy patch | agreement CLS | loss_repa (-cos) | "
              "loss_layersync (-cos) | loss_dispersive | img/s | train s |",
              "| --- |" + " --- |" * 19]
    for arm, stats in final.items():
        cells = [str(stats.get("fid", (0, 0, 0))[2])] + [
            fmt(stats.get(c), d) for c, d in (("fid", 2), ("sfid", 2), ("precision", 3), ("recall", 3),
                                              ("class_agreement", 3), ("loss_gen", 4), ("loss_cls", 4),
                                              ("target_entropy_cls", 4), ("teacher_cls_token_std", 4),
                                              ("teacher_cls_logit_std", 4), ("loss_patch", 4),
                                              ("target_entropy_patch", 4), ("agreement_cls", 3), ("loss_repa", 3),
                                              ("loss_layersync", 3), ("loss_dispersive", 3), ("images_per_s", 0),
                                              ("train_seconds", 0))]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if flat_cls:
        lines += ["", f"**CLS term carries no signal** in {', '.join(flat_cls)}: every recorded CLS target entropy "
                      f"(each seed, each evaluation point) lies within {NO_SIGNAL_TOLERANCE} of ln K, so the teacher's "
                      f"CLS targets were uniform and that term trained nothing image-specific."]
    lines += ["", "## Differences at the last point", "",
              "A difference *exceeds the seed spread* when |mean a - mean b| > 2 sqrt(s_a^2/n_a + s_b^2/n_b) "
              "(twice the standard error of the difference; s over seeds). Lower FID is better.", ""]
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            if a in final and b in final and "fid" in final[a] and "fid" in final[b]:
                fa, fb = final[a]["fid"], final[b]["fid"]
                verdict = "exceeds the seed spread" if exceeds_spread(fa, fb) else "within the seed spread"
                better = a if fa[0] < fb[0] else b
                lines.append(f"- {a} vs {b}: FID {fa[0]:.2f} vs {fb[0]:.2f} (difference {fa[0] - fb[0]:+.2f}); "
                             f"{better} lower, {verdict}")
    path.write_text("\n".join(lines) + "\n")


def plot(agg: dict, arms: list[str], x_key: str, path: Path, xlabel: str, suffix: str) -> Path:
    """Mean FID per arm, with a band of ± one standard deviation over seeds, against images seen or wall clock."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        points = [(images, s) for images, s in sorted(agg[arm].items()) if "fid" in s]
        if not points:
            continue
        x = [images if x_key == "images" else s["train_seconds"][0] for images, s in points]
        mean = np.array([s["fid"][0] for _, s in points])
        std = np.array([s["fid"][1] for _, s in points])
        ax.plot(x, mean, marker="o", label=arm)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"FID ({suffix}, CFG 1)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(args, plan: dict, client, done: dict, parent_run_id: str, outcomes: dict, out: Path) -> dict:
    """`done`: evaluated_steps() after the grid; each run's rows come from its MLflow history."""
    import mlflow
    from PIL import Image

    rows = []
    for label, (run_id, _) in done.items():
        if run_id:
            rows += collect_rows(client, run_id, plan["runs"][label], plan)
    write_csv(out / "results.csv", rows)
    agg = aggregate(rows, plan["arms"])
    write_summary(out / "summary.md", plan, args, agg, outcomes,
                  arms_without_cls_signal(rows, plan["arms"], plan["base"].model.head_out_size))
    plots = [plot(agg, plan["arms"], "images", out / "fid_vs_images.png", "images seen", plan["extractor"]),
             plot(agg, plan["arms"], "seconds", out / "fid_vs_wallclock.png", "training wall clock (s, per run)",
                  plan["extractor"])]
    with mlflow.start_run(run_id=parent_run_id, nested=mlflow.active_run() is not None):
        for artifact in ("results.csv", "summary.md", "outcomes.json"):
            mlflow.log_artifact(str(out / artifact))
        for picture in plots:
            with Image.open(picture) as image:
                mlflow.log_image(image.convert("RGB"), artifact_file=f"plots/{picture.name}")
        mlflow.log_metrics({"runs_completed": sum(o["status"] == "completed" for o in outcomes.values()),
                            "runs_failed": sum(o["status"] == "error" for o in outcomes.values())})
    return {"rows": rows, "aggregate": agg, "outcomes": outcomes, "out": str(out)}


# ---------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------

def check_same_judge(plan: dict, params: dict) -> None:
    """A continued study must score its new runs with the judge that scored its first ones: two domain judges
    trained on the same held-out images in another shard order put the same samples at FID 23.0 and 36.3."""
    recorded = params.get("judge.weights_sha256")
    current = plan["judge"].get("weights_sha256")
    if recorded and current and recorded != current:
        raise ConfigError("reference", f"study {plan['name']!r} was scored by a judge with weights sha256 "
                                       f"{recorded[:12]}..., the reference dataset's judge is now {current[:12]}... "
                                       f"(re-encoded or changed?); FIDs would not be comparable: use another --name")


def study(args) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import PARENT_ENV, tracking_uri, use_store
    from pipelines.trials import prepare_judge

    set_verbose(args.verbose)
    plan = plan_study(args)                        # everything that can be wrong fails here, before Ray
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(args.run_dir)
    use_store(uri)
    client = MlflowClient(uri)
    plan["judge"] = prepare_judge(plan["extractor"], plan["judge_dir"])
    existing = mlflow.search_runs(filter_string=tag_query({"sddit.study_name": plan["name"]}), output_format="list")
    if existing:
        check_same_judge(plan, existing[0].data.params)
        parent_run_id = existing[0].info.run_id
    else:
        parent = os.environ.get(PARENT_ENV) or None
        with mlflow.start_run(run_name=f"study {plan['name']}", parent_run_id=parent, nested=parent is not None,
                              tags={"sddit.stage": "study", "sddit.study_name": plan["name"]}) as run:
            mlflow.log_params({"arms": ",".join(plan["arms"]), "seeds": args.seeds, "images_per_arm": plan["images"],
                               "steps": plan["steps"], "eval_every_steps": plan["every"],
                               "eval_samples": args.eval_samples, "eval_heun_steps": args.eval_heun_steps,
                               "preset": plan["preset"], "overrides": " ".join(args.overrides)[:500],
                               "data": str(Path(args.data).resolve()),
                               "reference": plan["judge_dir"],
                               **{f"judge.{key}": value for key, value in plan["judge"].items()}})
            parent_run_id = run.info.run_id
    # seed by seed (every arm's seed 0 first): a study stopped part-way has each arm at the same number of seeds
    todo = sorted((label for label, o in outcomes_of(evaluated_steps(client, plan), plan, {}).items()
                   if o["status"] != "completed"), key=lambda label: plan["runs"][label]["seed"])
    if args.report_only:
        print(f"study {plan['name']}: --report-only: {len(todo)} unfinished runs left as they are", flush=True)
        todo = []
    pretrain_errors = pretrain_transfer_arms(args, plan, todo, parent_run_id, uri)
    todo = [label for label in todo if label not in pretrain_errors]
    errors = run_grid(args, plan, todo, parent_run_id, uri) if todo else {}
    errors.update(pretrain_errors)
    if not todo and not args.report_only:
        print(f"study {plan['name']}: all {len(plan['runs'])} runs already finished; rewriting the report", flush=True)
    done = evaluated_steps(client, plan)
    outcomes = outcomes_of(done, plan, errors)
    (out / "outcomes.json").write_text(json.dumps(outcomes, indent=2))
    summary = report(args, plan, client, done, parent_run_id, outcomes, out)
    failed = [label for label, o in outcomes.items() if o["status"] != "completed"]
    print(f"study {plan['name']}: {len(plan['runs']) - len(failed)} of {len(plan['runs'])} runs finished"
          + (f"; not finished: {', '.join(failed)}" if failed else "") + f"; report: {out / 'summary.md'}", flush=True)
    return summary


def pretrain_transfer_arms(args, plan: dict, todo: list[str], parent_run_id: str, uri: str) -> dict[str, str]:
    """Run the pre-training of every unfinished transfer run first (a grid of its own, finished ones kept), then
    point each transfer run at its checkpoint; -> {label: error} of the transfer runs that cannot start."""
    storage = storage_of(args)
    needed = {plan["runs"][label]["pretrain"] for label in todo if "pretrain" in plan["runs"][label]}
    found = {label: final_checkpoint(storage, plan["pretrain_runs"][label]) for label in needed}
    pending = sorted(label for label, checkpoint in found.items() if checkpoint is None)
    failed = run_grid(args, plan, pending, parent_run_id, uri, plan["pretrain_runs"], "pre-training runs") \
        if pending else {}
    found.update({label: final_checkpoint(storage, plan["pretrain_runs"][label]) for label in pending})
    errors = {}
    for label in todo:
        run = plan["runs"][label]
        if "pretrain" in run:
            checkpoint = found[run["pretrain"]]
            if checkpoint is None:
                errors[label] = f"its pre-training did not finish: {failed.get(run['pretrain'], 'no final checkpoint')}"
            else:
                run["init_from"] = str(checkpoint)
    return errors


def main(argv=None):
    return study(parse_args(argv))


def cli():
    """The console script (`pyproject.toml`): a user error is one line, not a traceback."""
    run_cli("study", main)


if __name__ == "__main__":
    cli()
