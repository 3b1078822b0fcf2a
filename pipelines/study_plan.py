"""The study's plan: its arms (a family and overrides each), the built-in studies and the paper's figures
for them, and the runs an invocation asks for (arm x seed, each with its config digest and name, and
the transfer arms' pre-training runs). No Ray, no MLflow: everything that can be wrong fails here."""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import yaml

from sddit.config import apply_overrides, load_preset
from sddit.data import DataError, Manifest
from sddit.errors import ConfigError
from sddit.models.registry import SWITCHES, ModelConfig, family_overrides, parse_name
from sddit.training import fit_to_dataset
from pipelines.common import warn_about_layout

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
    # neither: DiT plus SD-DiT's light decoder, which separates what the decoder does from what masking does
    "SD-DiT-no-disc-no-mask": ("SD-DiT", ["model.disc_weight=0", "model.cls_token=false", "model.mask_ratio=0"]),
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
    "DiT-SRA": ("DiT", ["model.sra_weight=0.2"]),
    # SRA's term in place of the discriminative loss: SD-DiT's masking and decoder kept, no head, no centring
    "SD-DiT-SRA": ("SD-DiT", ["model.disc_weight=0", "model.sra_weight=0.2"]),
    # MDT (Gao et al. 2023), the paper's masked baseline: as many blocks as the DiT arm, half of them its
    # decoder (the reference's S/2 splits its 12 the same way), at the encoder's width
    "MDT": ("MDT", ["model.depth=2", "model.decoder_depth=2"]),
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
    "self-supervision": ["DiT", "SD-DiT", "SD-DiT-no-disc", "DiT-SRA", "SD-DiT-SRA", "DiT-LayerSync", "DiT-Dispersive",
                         "MDT"],
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
    "self-supervision": "SRA (Jiang et al. 2025): consistent FID gains on DiT and SiT without an external encoder; "
                        "LayerSync (Haghighi et al. 2025): SiT-XL/2, 80 epochs, no CFG, FID 17.97 -> 11.24; "
                        "Dispersive Loss (Wang & He 2025): consistent FID gains on SiT and DiT of every size; "
                        "MDT(v2) (Gao et al. 2023): over 10x faster learning than DiT (its README; with the Adan optimiser, "
                        "which this harness does not use)",
}


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
# The plan
# ---------------------------------------------------------------------------------------------

# Config fields added after studies were recorded, each at its default, which leaves a run as it was (its switch
# off). A run's digest leaves them out at that value, so adding a switch to the library does not rename, and so
# restart, the runs recorded before it.
ADDED_LATER = {f"model.{field}": getattr(ModelConfig(), field) for field in (
    "layersync_weight", "layersync_shallow", "layersync_deep", "dispersive_weight", "dispersive_depth",
    "dispersive_temp", "sra_weight", "sra_student_depth", "sra_teacher_depth", "sra_time_shift", "sra_loss",
    "backbone", "mask_ratio_spread", "unmasked_pass")}


def run_digest(flat_config: dict, origin: dict) -> str:
    """8 hex digits of a run's config (and where it starts from): part of its name, so a rerun continues a run
    only if nothing about it changed."""
    kept = {key: value for key, value in flat_config.items() if key not in ADDED_LATER or ADDED_LATER[key] != value}
    return hashlib.sha256(json.dumps({**kept, **origin}, sort_keys=True, default=str).encode()).hexdigest()[:8]


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
            digest = run_digest(config.flat(), origin)
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
    digest = run_digest(apply_overrides(base, overrides + schedule).flat(), {"data": pretrain["data"]})
    return {"arm": arm, "seed": seed, "overrides": overrides + schedule, "data": pretrain["data"], "proxy": None,
            "steps": pretrain["steps"], "name": f"study-{args.name}-{slug(arm)}-pretrain-seed{seed}-{digest}",
            "params": {"study.name": args.name, "study.arm": arm, "study.seed": seed, "study.stage": "pretrain"}}
