"""Model zoo: `build('SD-DiT-XL/2', **overrides)`, and the configuration behind it.

The configuration half (the registry) needs neither torch nor timm, so a process that only reads configs
(a Tune trial's actor, a driver parsing its arguments) does not pay their import; the networks are
imported on first use."""
from __future__ import annotations

from sddit.models.registry import MODEL_NAMES, ModelConfig, model_config, parse_name


def build(name: str, **overrides) -> DiffusionModel:
    """A freshly initialised model from the registry, e.g. build('DiT-XL/2', learn_sigma=True)."""
    from sddit.models.model import DiffusionModel
    return DiffusionModel(model_config(name, **overrides))


def build_from_config(config: ModelConfig) -> DiffusionModel:
    from sddit.models.model import DiffusionModel
    return DiffusionModel(config.validate())


def __getattr__(name: str):
    if name in ("DiffusionModel", "StudentOutput"):
        from sddit.models import model
        return getattr(model, name)
    raise AttributeError(f"module 'sddit.models' has no attribute {name!r}")


__all__ = ["build", "build_from_config", "DiffusionModel", "StudentOutput", "ModelConfig",
           "model_config", "parse_name", "MODEL_NAMES"]
