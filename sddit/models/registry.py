"""Model configuration and the name registry: DiT-{S,B,L,XL}/{2,4,8}, MaskDiT-..., SD-DiT-...

One switchboard describes every family, so the baselines differ from SD-DiT only in these fields.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from sddit.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "SD-DiT-S/2"
    # data (filled from the dataset's codec and manifest)
    input_size: int = 32                  # latent side length
    in_channels: int = 4
    num_classes: int = 1000               # 0: unconditional
    # backbone (DiT)
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    learn_sigma: bool = False             # DiT's extra variance channels; EDM does not use them
    # the patch-grid side the sinusoidal positions span (0: this model's own grid). A model initialised from
    # a checkpoint of another resolution keeps the checkpoint's span, its own grid resampled onto it
    pos_embed_grid: int = 0
    sigma_data: float = 0.5
    # "dit", or "mdt": MDT's backbone (sddit/models/mdt.py: relative-position attention, learned positions, long
    # skips, the side-interpolater; its decoder at the encoder's width, decoder_hidden_size and _num_heads unused)
    backbone: str = "dit"
    # masking and decoder
    mask_ratio: float = 0.0               # fraction of patch tokens the encoder does not see
    mask_ratio_spread: float = 0.0        # MDT's schedule: each step's ratio drawn from U(mask_ratio, + spread)
    unmasked_pass: bool = False           # MDT: each step also denoises the unmasked image, its loss added
    mask_block_size: int = 1              # mask in blocks of b x b patches (MaskDM); 1: uniform random patches
    mask_crop: bool = False               # the visible tokens are one random square crop (MaskDM's crop masks)
    mask_token: bool = False              # fill invisible tokens with a learned token (MaskDiT) or the noisy patches (SD-DiT)
    mae_weight: float = 0.0               # MaskDiT's loss on masked patches
    decoder_depth: int = 0
    decoder_hidden_size: int = 512
    decoder_num_heads: int = 16
    # discrimination (0 weight: no CLS token use, no head, no teacher)
    cls_token: bool = False
    # how the CLS row passes the blocks' adaLN-Zero gates; the paper does not say. "open": 1 + gate, an ordinary
    # pre-LN residual at init, so the CLS differs between images from step 0 as DINO's and iBOT's does (the
    # default); "zero": gated like the patch tokens, so every block is the identity for it at init, the CLS
    # leaves the encoder as the same vector for every image and the teacher's CLS targets start uniform
    cls_gate: str = "open"
    disc_weight: float = 0.0
    head_hidden_size: int = 2048
    head_bottleneck_size: int = 256
    head_out_size: int = 8192             # K
    # REPA (Yu et al. 2025): align a projection of the encoder's hidden tokens after `repa_depth` blocks with
    # an external encoder's features of the clean image (0 weight: no projector, no features needed)
    repa_weight: float = 0.0              # lambda; REPA uses 0.5
    repa_depth: int = 8                   # encoder blocks before the tap (REPA: 8 of SiT-XL's 28)
    repa_projector_size: int = 2048       # hidden width of the 3-layer SiLU MLP projector
    repa_encoder: str = "timm:vit_base_patch14_dinov2"   # the dataset's features must come from this encoder
    repa_feature_dim: int = 768           # filled from the dataset's features
    # LayerSync (Haghighi et al. 2025): a shallow block's patch tokens pulled towards a deeper block's (a fixed
    # target: no gradient through it) by cosine, in the same forward; no parameters. 0 for a depth: the
    # reference's blocks 8 and 16 of SiT-XL's 28, scaled to this depth
    layersync_weight: float = 0.0         # the reference's 0.2
    layersync_shallow: int = 0
    layersync_deep: int = 0
    # Dispersive Loss (Wang & He 2025, InfoNCE-L2): the batch's flattened patch tokens after one block pushed
    # apart, no positive pairs, no parameters
    dispersive_weight: float = 0.0        # the reference training script's 0.25
    dispersive_depth: int = 0             # 0: the last encoder block (the reference's)
    dispersive_temp: float = 1.0          # the reference's: none (1)
    # SRA (Jiang et al. 2025): the student's patch tokens after an early block, through a small MLP head, regress
    # the generation EMA's tokens after a later block, on the same image and noise at a lower noise level: SRA's
    # time t - U(0, sra_time_shift) on the linear path x_t = (1 - t) x0 + t n, which is EDM's x0 + sigma n at
    # sigma = t / (1 - t) scaled by 1 / (1 + sigma)
    sra_weight: float = 0.0               # SRA's 2 x 0.1 (its weight before the decay it starts at epoch 150)
    sra_student_depth: int = 0            # 0: a third of the depth
    sra_teacher_depth: int = 0            # 0: two thirds of the depth
    sra_time_shift: float = 0.2
    sra_loss: str = "smooth_l1"           # SRA's smooth L1 (beta 0.05), or "cosine": 1 - cos

    def validate(self) -> "ModelConfig":
        def need(ok: bool, field: str, message: str):
            if not ok:
                raise ConfigError(f"model.{field}", message)

        need(parse_name(self.name) is not None, "name",
             f"unknown model {self.name!r}; expected one of {', '.join(MODEL_NAMES)}")
        for field in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads",
                      "head_hidden_size", "head_bottleneck_size", "head_out_size"):
            need(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
        need(self.pos_embed_grid >= 0, "pos_embed_grid",
             f"must be >= 0 (0 = the model's own grid), got {self.pos_embed_grid}")
        need(self.num_classes >= 0, "num_classes", f"must be >= 0 (0 = unconditional), got {self.num_classes}")
        need(self.input_size % self.patch_size == 0, "input_size",
             f"{self.input_size} is not divisible by patch_size {self.patch_size}")
        need(self.hidden_size % self.num_heads == 0, "num_heads",
             f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        need(0.0 <= self.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        need(self.mask_ratio_spread >= 0 and self.mask_ratio + self.mask_ratio_spread < 1.0, "mask_ratio_spread",
             f"needs >= 0 and mask_ratio + spread < 1, got {self.mask_ratio_spread} at mask_ratio {self.mask_ratio}")
        need(not self.unmasked_pass or self.mask_ratio > 0, "unmasked_pass",
             "an extra unmasked pass needs a masked one (mask_ratio > 0)")
        need(self.backbone in ("dit", "mdt"), "backbone", f"must be dit or mdt, got {self.backbone!r}")
        if self.backbone == "mdt":
            need(self.depth % 2 == 0, "depth", f"MDT's long skips pair the encoder's two halves: needs an even "
                                               f"depth, got {self.depth}")
            need(not self.cls_token, "cls_token", "MDT's backbone has no CLS token (no discriminative branch)")
            need(not self.mask_token, "mask_token", "MDT's side-interpolater brings its own mask token; "
                                                    "model.mask_token is MaskDiT's")
            need(self.pos_embed_grid == 0, "pos_embed_grid", "MDT's position embeddings are learned, not resampled")
        grid = self.input_size // self.patch_size
        need(1 <= self.mask_block_size <= grid, "mask_block_size",
             f"must be in 1..{grid} (the patch grid's side), got {self.mask_block_size}")
        need(not (self.mask_crop and self.mask_block_size > 1), "mask_crop",
             "crop masks and block masks (mask_block_size > 1) exclude each other")
        need(self.sigma_data > 0, "sigma_data", f"must be > 0, got {self.sigma_data}")
        need(self.decoder_depth >= 0, "decoder_depth", f"must be >= 0, got {self.decoder_depth}")
        if self.decoder_depth > 0:
            need(self.decoder_hidden_size % self.decoder_num_heads == 0, "decoder_num_heads",
                 f"decoder_hidden_size {self.decoder_hidden_size} is not divisible by {self.decoder_num_heads} heads")
        need(self.mae_weight >= 0, "mae_weight", f"must be >= 0, got {self.mae_weight}")
        need(self.disc_weight >= 0, "disc_weight", f"must be >= 0, got {self.disc_weight}")
        need(self.cls_gate in ("open", "zero"), "cls_gate", f"must be open or zero, got {self.cls_gate!r}")
        need(self.disc_weight == 0 or self.cls_token, "cls_token",
             "the discriminative loss (disc_weight > 0) needs the CLS token")
        need(not self.mask_token or self.mask_ratio > 0, "mask_token", "a mask token needs mask_ratio > 0")
        need(self.repa_weight >= 0, "repa_weight", f"must be >= 0, got {self.repa_weight}")
        if self.repa_weight > 0:
            need(1 <= self.repa_depth <= self.depth, "repa_depth",
                 f"must be in 1..depth ({self.depth}) to tap the encoder, got {self.repa_depth}")
            for field in ("repa_projector_size", "repa_feature_dim"):
                need(getattr(self, field) >= 1, field, f"must be >= 1, got {getattr(self, field)}")
        need(self.layersync_weight >= 0, "layersync_weight", f"must be >= 0, got {self.layersync_weight}")
        if self.layersync_weight > 0:
            shallow, deep = self.layersync_blocks()
            need(1 <= shallow < deep <= self.depth, "layersync_deep",
                 f"needs 1 <= layersync_shallow < layersync_deep <= depth ({self.depth}), got {shallow} and {deep}")
        need(self.dispersive_weight >= 0, "dispersive_weight", f"must be >= 0, got {self.dispersive_weight}")
        need(0 <= self.dispersive_depth <= self.depth, "dispersive_depth",
             f"must be in 0..depth ({self.depth}; 0: the last block), got {self.dispersive_depth}")
        need(self.dispersive_temp > 0, "dispersive_temp", f"must be > 0, got {self.dispersive_temp}")
        need(self.sra_weight >= 0, "sra_weight", f"must be >= 0, got {self.sra_weight}")
        need(self.sra_loss in ("smooth_l1", "cosine"), "sra_loss", f"must be smooth_l1 or cosine, got {self.sra_loss!r}")
        need(0 <= self.sra_time_shift < 1, "sra_time_shift", f"must be in [0, 1), got {self.sra_time_shift}")
        if self.sra_weight > 0:
            student, teacher = self.sra_blocks()
            need(1 <= student <= teacher <= self.depth, "sra_teacher_depth",
                 f"needs 1 <= sra_student_depth <= sra_teacher_depth <= depth ({self.depth}), got {student} and "
                 f"{teacher}")
        return self

    def layersync_blocks(self) -> tuple[int, int]:
        """(shallow, deep) block depths of LayerSync's pair; an unset one scaled from the reference's 8 / 16 of 28."""
        return (self.layersync_shallow or max(1, round(self.depth * 8 / 28)),
                self.layersync_deep or max(2, round(self.depth * 16 / 28)))

    def dispersive_block(self) -> int:
        return self.dispersive_depth or self.depth

    def sra_blocks(self) -> tuple[int, int]:
        """(student, teacher) block depths of SRA's pair; an unset one at a third / two thirds of the depth."""
        return (self.sra_student_depth or max(1, round(self.depth / 3)),
                self.sra_teacher_depth or max(1, round(2 * self.depth / 3)))

    def tapped_depths(self) -> tuple[int, ...]:
        """The student encoder depths whose patch tokens a training loss term reads (REPA, LayerSync, Dispersive,
        SRA)."""
        taps = set()
        if self.repa_weight > 0:
            taps.add(self.repa_depth)
        if self.layersync_weight > 0:
            taps.update(self.layersync_blocks())
        if self.dispersive_weight > 0:
            taps.add(self.dispersive_block())
        if self.sra_weight > 0:
            taps.add(self.sra_blocks()[0])
        return tuple(sorted(taps))


# ---------------------------------------------------------------------------------------------
# Registry: sizes as in DiT, families as in the papers
# ---------------------------------------------------------------------------------------------

SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
LIGHT_DECODER = dict(decoder_depth=8, decoder_hidden_size=512, decoder_num_heads=16)
# What makes a family: its values of the switches; a family not named sets the field's default
SWITCHES = {
    "DiT": dict(),
    "MaskDiT": dict(mask_ratio=0.5, mask_token=True, mae_weight=0.1),
    "SD-DiT": dict(mask_ratio=0.2, cls_token=True, disc_weight=1.0),
    # MDT(v2)'s training script: mask ratio 0.3 + U(0, 0.2) per step, a masked and an unmasked pass
    "MDT": dict(backbone="mdt", mask_ratio=0.3, mask_ratio_spread=0.2, unmasked_pass=True),
}
SWITCH_FIELDS = ("backbone", "mask_ratio", "mask_ratio_spread", "unmasked_pass", "mask_token", "mae_weight",
                 "cls_token", "disc_weight", "repa_weight", "layersync_weight", "dispersive_weight", "sra_weight")
FAMILIES = {family: {**switches, **(LIGHT_DECODER if family in ("MaskDiT", "SD-DiT") else {})}
            for family, switches in SWITCHES.items()}
# MDT's decoder blocks are part of the size's depth, at its width: the reference's commands use 6 of S/2's 12
# and 4 of XL/2's 28 (B and L, which it does not train, follow S and XL)
MDT_DECODER_DEPTH = {"S": 6, "B": 6, "L": 4, "XL": 4}
PATCH_SIZES = (2, 4, 8)
MODEL_NAMES = tuple(f"{family}-{size}/{patch}" for family in FAMILIES for size in SIZES for patch in PATCH_SIZES)
_NAME = re.compile(r"^(DiT|MaskDiT|SD-DiT|MDT)-(S|B|L|XL)/(2|4|8)$")


def architecture(family: str, size: str) -> dict:
    """The size's width, depth and heads as `family` lays them out (MDT: the depth split into encoder and
    decoder)."""
    if family != "MDT":
        return SIZES[size]
    decoder = MDT_DECODER_DEPTH[size]
    return {**SIZES[size], "depth": SIZES[size]["depth"] - decoder, "decoder_depth": decoder}


def parse_name(name: str):
    """'SD-DiT-XL/2' -> ('SD-DiT', 'XL', 2), or None for an unknown name."""
    match = _NAME.match(name) if isinstance(name, str) else None
    return (match[1], match[2], int(match[3])) if match else None


def registry_fields(name: str) -> dict:
    """What the name `name` determines: its size's width, depth and heads, its patch size and its family's
    switches (all families' fields, at this family's values). Setting `model.name` alone renames a config and
    keeps its architecture (the presets' small models carry registry names); this gives the rest."""
    family_fields = {key for fields in FAMILIES.values() for key in fields}
    registered = model_config(name)
    return {key: getattr(registered, key) for key in (*SIZES["S"], "patch_size", *sorted(family_fields))}


def model_config(name: str, **overrides) -> ModelConfig:
    """The registry's configuration for `name`, with `overrides` applied, validated."""
    parsed = parse_name(name)
    if parsed is None:
        raise ConfigError("model.name", f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    family, size, patch = parsed
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    for key in overrides:
        if key not in known:
            raise ConfigError(f"model.{key}", f"unknown field; known fields: {', '.join(sorted(known))}")
    fields = {**architecture(family, size), **FAMILIES[family], "patch_size": patch, **overrides}
    return ModelConfig(name=name, **fields).validate()


def family_overrides(family: str) -> list[str]:
    """`SECTION.FIELD=VALUE` overrides that turn any config into `family`, every switch set explicitly (so the
    result does not depend on the family it started from); width, depth, head and the decoder's size are kept,
    a family without a decoder drops it. The study's arms are built on these."""
    if family not in SWITCHES:
        raise ConfigError("model.name", f"unknown family {family!r}; expected one of {', '.join(SWITCHES)}")
    defaults = ModelConfig()
    values = {field: SWITCHES[family].get(field, getattr(defaults, field)) for field in SWITCH_FIELDS}
    if family == "DiT":
        values["decoder_depth"] = 0
    return [f"model.{field}={str(value).lower() if isinstance(value, bool) else value}"
            for field, value in values.items()]
