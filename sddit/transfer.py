"""Resolution transfer (Berrada et al. 2024): weights trained at one resolution initialise a model at another.

Everything in a patch DiT is independent of the grid except the sinusoidal position table. The new model
keeps the positions the weights were trained with: its own grid is resampled onto the old grid's span
(`model.pos_embed_grid`, see `sincos_2d`) instead of extending the table past positions never seen.
The noise level and the guidance scale have their own settings (`diffusion.sigma_scale`, the evaluation's
`guidance_factor`), because they are choices about the new training run, not facts about the weights.
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from sddit.config import Config


def position_span(model_config) -> int:
    """The patch-grid side a model's positions cover."""
    return model_config.pos_embed_grid or model_config.input_size // model_config.patch_size


def transfer_config(config: Config, source: Config) -> Config:
    """`config`, ready to start from `source`'s weights: when the patch grids differ, the positions span the
    grid `source` was trained on (unless `config` names a span itself)."""
    grid = config.model.input_size // config.model.patch_size
    span = position_span(source.model)
    if config.model.pos_embed_grid or grid == span:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(config.model, pos_embed_grid=span).validate())


def load_weights(module: nn.Module, state: dict) -> None:
    """Load a checkpoint's weights into `module` except its position tables, which are functions of the
    grid that `module` has already built for its own (resampled) grid."""
    missing, unexpected = module.load_state_dict(
        {key: value for key, value in state.items() if not key.endswith("pos_embed")}, strict=False)
    missing = [key for key in missing if not key.endswith("pos_embed")]
    if missing or unexpected:
        raise RuntimeError(f"the checkpoint's weights do not fit this model: missing {missing}, unexpected "
                           f"{unexpected}")
