"""Typed run configuration: dataclasses, YAML presets, and validation that names the bad field.

A preset is a YAML file in `sddit/presets/` (or any path). Every section is a dataclass; unknown
keys and out-of-range values raise `ConfigError("section.field: ...")` before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sddit.errors import ConfigError
from sddit.models.registry import ModelConfig, model_config

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DiffusionConfig:
    p_mean: float = -1.2                  # ln(sigma) ~ N(p_mean, p_std^2) in training
    p_std: float = 1.2
    # training noise levels times this factor: ln(sigma) ~ N(p_mean + ln(sigma_scale), p_std^2). At s times the
    # resolution of the recipe, s keeps the noise on the coarse structure where it was (README, "Resolution
    # transfer"); the teacher's fixed sigma is not scaled
    sigma_scale: float = 1.0
    label_dropout: float = 0.1            # labels replaced by the null class, for classifier-free guidance
    teacher_sigma: float = 0.002          # noise level of the teacher's input x0 + teacher_sigma * n
    # fixed: teacher_sigma; student: drawn per sample from the student's ln(sigma) ~ N(p_mean, p_std^2) (paper Fig. 6)
    teacher_sigma_dist: str = "fixed"

    def validate(self):
        _check(self.p_std > 0, "diffusion.p_std", f"must be > 0, got {self.p_std}")
        _check(self.sigma_scale > 0, "diffusion.sigma_scale", f"must be > 0, got {self.sigma_scale}")
        _check(0 <= self.label_dropout < 1, "diffusion.label_dropout", f"must be in [0, 1), got {self.label_dropout}")
        _check(self.teacher_sigma > 0, "diffusion.teacher_sigma", f"must be > 0, got {self.teacher_sigma}")
        _check(self.teacher_sigma_dist in ("fixed", "student"), "diffusion.teacher_sigma_dist",
               f"must be fixed or student, got {self.teacher_sigma_dist!r}")


@dataclass
class DiscriminationConfig:
    student_temp: float = 0.1
    teacher_temp_start: float = 0.09      # linear warm-up to teacher_temp_end, then constant
    teacher_temp_end: float = 0.099
    teacher_temp_warmup_steps: int = 30_000
    # DINO (CLS) and iBOT (patch) keep their centres and loss weights apart; model.disc_weight scales both
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    cls_centre_momentum: float = 0.9
    patch_centre_momentum: float = 0.9
    # whether the teacher sees the class label (the paper's teacher is the EMA of the conditional encoder; it
    # does not say which label it gets). false: the null class, so the teacher's targets come from the image
    # alone and the student cannot match them from the label it is also given
    teacher_label: bool = True

    def validate(self):
        for name in ("student_temp", "teacher_temp_start", "teacher_temp_end"):
            value = getattr(self, name)
            _check(value > 0, f"disc.{name}", f"must be > 0, got {value}")
        _check(self.teacher_temp_warmup_steps >= 0, "disc.teacher_temp_warmup_steps",
               f"must be >= 0, got {self.teacher_temp_warmup_steps}")
        for name in ("cls_weight", "patch_weight"):
            _check(getattr(self, name) >= 0, f"disc.{name}", f"must be >= 0, got {getattr(self, name)}")
        for name in ("cls_centre_momentum", "patch_centre_momentum"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"disc.{name}", f"must be in [0, 1), got {value}")


@dataclass
class EMAConfig:
    teacher_momentum_start: float = 0.996  # cosine from start to end over training, per iteration
    teacher_momentum_end: float = 0.999
    generation_decay: float = 0.9999       # EMA of the student encoder + decoder used for sampling
    generation_warmup: bool = True          # decay min(decay, (1 + step) / (10 + step)): short runs sample trained weights

    def validate(self):
        for name in ("teacher_momentum_start", "teacher_momentum_end", "generation_decay"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"ema.{name}", f"must be in [0, 1), got {value}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    # linear warm-up: step s (from 0) trains at lr * (s + 1) / warmup_steps until it reaches lr; 0: none (DiT's
    # and the paper's recipe say nothing of one; DINO warms up its lr over 10 epochs)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 256                  # global, across all workers
    grad_clip: float = 0.0                 # 0: off
    precision: str = "fp32"                # fp32 | bf16 (autocast on GPU; the paper saw NaNs with mixed precision at XL)

    def validate(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0 (0: none), got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"must be two values in [0, 1), got {self.betas}")
        _check(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _check(self.precision in ("fp32", "bf16"), "optim.precision", f"must be fp32 or bf16, got {self.precision!r}")


@dataclass
class TrainConfig:
    steps: int = 400_000
    seed: int = 0
    log_every: int = 100
    sample_every: int = 10_000
    checkpoint_every: int = 5_000
    keep_checkpoints: int = 3
    max_bad_steps: int = 10                # consecutive non-finite steps before the run stops
    compile: bool = False                  # torch.compile student, head, teacher and loss (worth it on GPU)
    sample_cfg_scale: float = 1.5          # guidance for the sample grids logged during training
    sample_count: int = 64                 # images in each of those grids; 0: no grids
    # the last fraction of `steps` (rounded to whole steps) is MaskDM's fine-tuning phase (MaskDiT's unmasking
    # tuning): every token visible, the full denoising loss, the optimiser and EMAs carried on from the masked
    # pre-training before it. A fraction, so a study or sweep that changes `steps` keeps the phases' proportions
    unmasked_fraction: float = 0.0

    def validate(self):
        for name in ("steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            value = getattr(self, name)
            _check(value >= 1, f"train.{name}", f"must be >= 1, got {value}")
        _check(self.sample_count >= 0, "train.sample_count", f"must be >= 0 (0: no grids), got {self.sample_count}")
        _check(0 <= self.unmasked_fraction <= 1, "train.unmasked_fraction",
               f"must be in [0, 1], got {self.unmasked_fraction}")

    @property
    def unmasked_from(self) -> int:
        """The first step of the unmasked fine-tuning phase (`steps` when there is none)."""
        return self.steps - round(self.unmasked_fraction * self.steps)


@dataclass
class DataConfig:
    codec: str = "sd-vae"                  # sd-vae | pixel
    resolution: int = 256

    def validate(self):
        _check(self.codec in ("sd-vae", "pixel"), "data.codec", f"must be sd-vae or pixel, got {self.codec!r}")
        _check(self.resolution >= 8, "data.resolution", f"must be >= 8, got {self.resolution}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    disc: DiscriminationConfig = field(default_factory=DiscriminationConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "Config":
        self.model.validate()
        for section in (self.diffusion, self.disc, self.ema, self.optim, self.train, self.data):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'model.mask_ratio': 0.2, ...}: the form MLflow params and `--set` overrides use."""
        return {f"{section}.{key}": value
                for section, values in self.to_dict().items() for key, value in values.items()}


_SECTION_TYPES = {"model": ModelConfig, "diffusion": DiffusionConfig, "disc": DiscriminationConfig,
                  "ema": EMAConfig, "optim": OptimConfig, "train": TrainConfig, "data": DataConfig}


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(field_name, message)


def _coerce(section: str, key: str, value, default):
    """Bring a YAML / command-line value to the type of the field's default, or name the field."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(type(d)(v) for d, v in zip(default, items, strict=True))
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{section}.{key}", f"expected {type(default).__name__}, got {value!r}") from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (a parsed preset); unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError("config", f"expected a mapping of sections, got {type(data).__name__}")
    for section in data:
        _check(section in _SECTION_TYPES, section, f"unknown section; known: {', '.join(_SECTION_TYPES)}")
    sections = {}
    for section, cls in _SECTION_TYPES.items():
        values = dict(data.get(section) or {})
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            _check(key in known, f"{section}.{key}", f"unknown field; known fields: {', '.join(sorted(known))}")
        coerced = {key: _coerce(section, key, value, getattr(defaults, key)) for key, value in values.items()}
        if section == "model":
            name = coerced.pop("name", defaults.name)
            sections[section] = model_config(name, **coerced)
        else:
            sections[section] = cls(**coerced)
    return Config(**sections).validate()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path) -> Config:
    """A shipped preset by name ('demo', 'imagenet256-XL2') or a YAML file by path. A preset may start from
    another (`base: NAME`) and set only the fields it changes."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        _check(path.exists(), "preset", f"unknown preset {str(name_or_path)!r}; available: {', '.join(preset_names())}")
    _check(path.exists(), "preset", f"no such file: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base is None:
        return config_from_dict(data)
    merged = load_preset(base).to_dict()
    for section, fields in data.items():
        _check(section in merged and isinstance(fields, dict), section, f"{path}: unknown section")
        merged[section].update(fields)
    return config_from_dict(merged)


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """Apply ['model.mask_ratio=0.5', 'optim.lr=3e-4', ...] and re-validate."""
    data = config.to_dict()
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        _check(bool(sep and dot), key.strip() or assignment, "expected SECTION.FIELD=VALUE")
        _check(section in data, section, f"unknown section; known: {', '.join(data)}")
        data[section][name] = yaml.safe_load(value) if value.strip() else value
    return config_from_dict(data)


def save_config(config: Config, path: str | Path) -> None:
    data = config.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
