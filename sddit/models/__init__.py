"""Model zoo: `build('SD-DiT-XL/2', **overrides)`, and the configuration behind it."""
from __future__ import annotations

from sddit.models.model import DiffusionModel, StudentOutput
from sddit.models.registry import MODEL_NAMES, ModelConfig, model_config, parse_name


def build(name: str, **overrides) -> DiffusionModel:
    """A freshly initialised model from the registry, e.g. build('DiT-XL/2', learn_sigma=True)."""
    return DiffusionModel(model_config(name, **overrides))


def build_from_config(config: ModelConfig) -> DiffusionModel:
    return DiffusionModel(config.validate())


__all__ = ["build", "build_from_config", "DiffusionModel", "StudentOutput", "ModelConfig",
           "model_config", "parse_name", "MODEL_NAMES"]
