import math

import pytest
import torch

from sddit.errors import ConfigError
from sddit.models import MODEL_NAMES, build
from tests.conftest import tiny_config
from sddit.models import build_from_config


def count_student(model):
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("teacher."))


@pytest.mark.parametrize("name,expected", [
    ("DiT-XL/2", 675_129_632), ("DiT-L/2", 458_102_816), ("DiT-B/2", 130_512_416), ("DiT-S/2", 32_963_360),
])
def test_dit_parameter_counts_match_reference(name, expected):
    with torch.device("meta"):
        model = build(name, learn_sigma=True)
    assert count_student(model) == expected
    assert model.teacher is None
    net = model.denoiser.net
    assert net.out_channels == 8
    assert net.encoder.y_embedder.embedding_table.num_embeddings == 1001


def test_sddit_xl2_student_within_one_percent_of_paper():
    with torch.device("meta"):
        model = build("SD-DiT-XL/2")
    assert abs(count_student(model) / 740.6e6 - 1) < 0.01
    teacher = sum(p.numel() for n, p in model.named_parameters() if n.startswith("teacher."))
    encoder = sum(p.numel() for p in model.denoiser.net.encoder.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert teacher == encoder + head


@pytest.mark.parametrize("name, reference, blocks, heads", [("MDT-S/2", 38_454_872, 6 + 6 + 1, 6),
                                                          ("MDT-XL/2", 742_263_904, 24 + 4 + 1, 16)])
def test_mdt_parameter_counts_match_its_reference_code(name, reference, blocks, heads):
    """The reference's count is sail-sg/MDT's MDTv2 at its commands' decode_layer (6 for S/2, 4 for XL/2),
    learn_sigma and 1000 classes, counted by building it. Ours differs only by the 3 rows of each block's
    relative-position table that BEiT, whose table MDT took, keeps for a CLS token MDT does not have."""
    with torch.device("meta"):
        model = build(name, learn_sigma=True)
    assert count_student(model) == reference - 3 * heads * blocks
    assert abs(count_student(model) / reference - 1) < 0.01
    cfg = model.config
    assert (cfg.depth + cfg.decoder_depth, cfg.backbone, cfg.mask_ratio, cfg.mask_ratio_spread) == (
        {"MDT-S/2": 12, "MDT-XL/2": 28}[name], "mdt", 0.3, 0.2)


def test_every_registered_name_builds_with_its_sizes():
    assert len(MODEL_NAMES) == 48
    with torch.device("meta"):
        for name in MODEL_NAMES:
            model = build(name)
            cfg = model.config
            assert cfg.hidden_size % cfg.num_heads == 0
            assert model.denoiser.net.encoder.x_embedder.num_patches == (32 // cfg.patch_size) ** 2
    assert build("SD-DiT-B/4", input_size=16).config.depth == 12


def test_family_switchboard():
    with torch.device("meta"):
        dit, maskdit, sddit = build("DiT-S/2"), build("MaskDiT-S/2"), build("SD-DiT-S/2")
    assert (dit.config.mask_ratio, dit.config.decoder_depth, dit.teacher) == (0.0, 0, None)
    assert maskdit.config.mask_ratio == 0.5 and maskdit.config.mask_token and maskdit.config.mae_weight == 0.1
    assert maskdit.teacher is None and maskdit.denoiser.net.decoder.mask_token is not None
    assert sddit.config.mask_ratio == 0.2 and sddit.denoiser.net.decoder.mask_token is None
    assert sddit.config.decoder_depth == 8 and sddit.config.decoder_hidden_size == 512
    assert sddit.teacher is not None and sddit.head.last_layer.out_features == 8192


def test_teacher_parameters_are_frozen_and_named_teacher():
    model = build_from_config(tiny_config().model)
    for name, p in model.named_parameters():
        if name.startswith("teacher."):
            assert not p.requires_grad
    assert any(n.startswith("teacher.encoder.blocks.") for n, _ in model.named_parameters())
    assert any(n.startswith("teacher.head.") for n, _ in model.named_parameters())


def test_token_counts_seen_by_encoder_and_decoder():
    config = tiny_config(input_size=8, mask_ratio=0.25)     # 16 patches, keep int(16 * 0.75) = 12
    model = build_from_config(config.model)
    seen = {}
    net = model.denoiser.net
    net.encoder.blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("encoder", a[0].shape))
    net.decoder.blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("decoder", a[0].shape))
    from sddit.models.dit import random_keep
    ids_keep = random_keep(3, 16, 0.25)
    out = model(torch.randn(3, 2, 8, 8), torch.full((3,), 1.0), torch.tensor([0, 1, 2]), ids_keep)
    assert seen["encoder"] == (3, 1 + 12, 32)               # CLS + visible tokens only
    assert seen["decoder"] == (3, 16, 16)                   # every patch, at decoder width
    assert out.denoised.shape == (3, 2, 8, 8)
    assert out.logits.shape == (3, 13, 64)


def test_random_keep_is_per_sample_sorted_and_unique():
    from sddit.models.dit import random_keep
    ids = random_keep(64, 256, 0.2, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (64, 204)
    assert (ids.diff(dim=1) > 0).all()
    assert len({tuple(row.tolist()) for row in ids}) == 64  # different positions per sample


def test_invisible_tokens_are_the_noisy_patches_not_a_learned_token():
    """SD-DiT puts the invisible noisy patches back, so the network output depends on them;
    MaskDiT fills those positions with its mask token, so its output cannot."""
    ids_keep = torch.arange(8).unsqueeze(0)                 # keep the first 8 of 16 patches (top half)
    x = torch.randn(1, 2, 8, 8)
    x2 = x.clone()
    x2[..., 4:, :] += 1.0                                   # bottom half: only invisible patches change
    t, y = torch.tensor([0.0]), torch.tensor([1])
    for name, depends in (("SD-DiT-S/2", True), ("MaskDiT-S/2", False)):
        model = build_from_config(tiny_config(name, mask_ratio=0.5).model)
        torch.nn.init.normal_(model.denoiser.net.decoder.final_layer.linear.weight)  # zero-init would hide it
        f1 = model.denoiser.net(x, t, y, ids_keep)[0]
        f2 = model.denoiser.net(x2, t, y, ids_keep)[0]
        assert (not torch.allclose(f1[..., 4:, :], f2[..., 4:, :])) == depends, name


def test_unconditional_model_has_no_label_table():
    model = build_from_config(tiny_config(num_classes=0).model)
    assert model.denoiser.net.encoder.y_embedder is None
    d = model.denoiser(torch.randn(2, 2, 8, 8), torch.tensor(1.0), None)
    assert d.shape == (2, 2, 8, 8)


@pytest.mark.parametrize("name,kwargs,field", [
    ("SD-DiT-Q/2", {}, "model.name"),
    ("SD-DiT-S/3", {}, "model.name"),
    ("SD-DiT-S/2", {"mask_ratio": 1.0}, "model.mask_ratio"),
    ("SD-DiT-S/2", {"mask_ratio": -0.1}, "model.mask_ratio"),
    ("SD-DiT-S/2", {"num_heads": 5}, "model.num_heads"),
    ("SD-DiT-S/2", {"input_size": 31}, "model.input_size"),
    ("SD-DiT-S/2", {"cls_token": False}, "model.cls_token"),
    ("SD-DiT-S/2", {"cls_gate": "half"}, "model.cls_gate"),
    ("SD-DiT-S/2", {"no_such_field": 1}, "model.no_such_field"),
])
def test_bad_model_config_names_the_field(name, kwargs, field):
    with pytest.raises(ConfigError) as info:
        build(name, **kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(field)


# ---------------------------------------------------------------------------------------------
# Block-wise masks (MaskDM)
# ---------------------------------------------------------------------------------------------

def masked_blocks(ids_keep, grid: int, block: int) -> torch.Tensor:
    """[N, blocks] count of masked tokens in each block of block x block patches."""
    batch = ids_keep.shape[0]
    masked = torch.ones(batch, grid * grid).scatter_(1, ids_keep, 0.0).view(batch, grid, grid)
    return torch.nn.functional.avg_pool2d(masked[:, None], block, ceil_mode=True).flatten(1) * block * block


def test_block_size_one_draws_the_same_uniform_masks_as_before():
    from sddit.models.dit import random_keep
    ids = random_keep(4, 64, 0.3, block_size=1, generator=torch.Generator().manual_seed(3))
    scores = torch.rand(4, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ids, scores.argsort(dim=1)[:, :int(64 * 0.7)].sort(dim=1).values)


@pytest.mark.parametrize("grid, block, ratio", [(8, 2, 0.5), (16, 4, 0.25), (16, 2, 0.75), (8, 4, 0.5)])
def test_block_masks_at_whole_block_ratios_mask_whole_blocks(grid, block, ratio):
    from sddit.models.dit import random_keep
    ids = random_keep(32, grid * grid, ratio, block_size=block, generator=torch.Generator().manual_seed(0))
    counts = masked_blocks(ids, grid, block)
    assert set(counts.unique().tolist()) == {0.0, float(block * block)}     # every block all masked or all seen
    assert torch.equal(counts.sum(dim=1), torch.full((32,), grid * grid * ratio))
    assert len({tuple(row.tolist()) for row in ids}) > 1                     # per sample, not one pattern


@pytest.mark.parametrize("grid, block, ratio", [(8, 2, 0.3), (16, 4, 0.2), (10, 3, 0.55), (16, 16, 0.4)])
def test_block_masks_keep_the_exact_count_with_at_most_one_split_block(grid, block, ratio):
    from sddit.models.dit import random_keep
    ids = random_keep(32, grid * grid, ratio, block_size=block, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (32, int(grid * grid * (1 - ratio)))
    assert (ids[:, 1:] > ids[:, :-1]).all()                                  # sorted, no repeats
    sizes = masked_blocks(torch.zeros(1, 0, dtype=torch.long), grid, block)  # tokens per block (edge blocks smaller)
    counts = masked_blocks(ids, grid, block)
    split = (counts > 0) & (counts < sizes)
    assert (split.sum(dim=1) <= 1).all()


def test_mask_block_size_is_checked_against_the_patch_grid():
    with pytest.raises(ConfigError, match="model.mask_block_size"):
        tiny_config("MaskDiT-S/2", mask_ratio=0.5, mask_block_size=5)      # 8x8 input, patch 2: a 4x4 grid
    assert tiny_config("MaskDiT-S/2", mask_ratio=0.5, mask_block_size=4).model.mask_block_size == 4


@pytest.mark.parametrize("grid, ratio", [(8, 0.75), (8, 0.5), (16, 0.6), (4, 0.0)])
def test_crop_masks_keep_one_window_filled_row_by_row(grid, ratio):
    from sddit.models.dit import random_keep
    ids = random_keep(64, grid * grid, ratio, crop=True, generator=torch.Generator().manual_seed(2))
    keep = int(grid * grid * (1 - ratio))
    side = math.ceil(math.sqrt(keep))
    assert ids.shape == (64, keep) and (ids[:, 1:] > ids[:, :-1]).all()
    rows, cols = ids // grid, ids % grid
    top, left = rows.min(dim=1).values, cols.min(dim=1).values
    assert ((rows - top[:, None]) < side).all() and ((cols - left[:, None]) < side).all()   # inside one window
    window = (rows - top[:, None]) * side + (cols - left[:, None])
    assert torch.equal(window, torch.arange(keep).expand(64, -1))     # its first K cells, row by row
    if side < grid:
        assert len({(int(t), int(l)) for t, l in zip(top, left)}) > 1   # the window moves between samples


def test_crop_and_block_masks_exclude_each_other():
    with pytest.raises(ConfigError, match="model.mask_crop"):
        tiny_config("MaskDiT-S/2", mask_ratio=0.5, mask_block_size=2, mask_crop=True)


# ---------------------------------------------------------------------------------------------
# The CLS token's gate
# ---------------------------------------------------------------------------------------------

def encoder_cls_at_init(cls_gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLS tokens [N, D], patch tokens [N, L, D]) out of a freshly initialised SD-DiT encoder for 6 images."""
    torch.manual_seed(0)
    model = build("SD-DiT-S/2", input_size=8, in_channels=2, num_classes=5, hidden_size=32, depth=2, num_heads=2,
                  decoder_depth=1, decoder_hidden_size=16, decoder_num_heads=2, head_hidden_size=32,
                  head_bottleneck_size=16, head_out_size=64, cls_gate=cls_gate)
    encoder = model.denoiser.net.encoder
    x = torch.randn(6, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    tokens = encoder(x, torch.zeros(6), torch.arange(6) % 5)[0]
    return tokens[:, 0], tokens[:, 1:], encoder


def test_an_open_cls_differs_between_images_at_init_and_a_zero_gated_one_does_not():
    cls, patches, encoder = encoder_cls_at_init("zero")
    # adaLN-Zero: every block is the identity at init, so the CLS comes out as the learned token for every image
    assert torch.equal(cls, encoder.cls_token[0].expand_as(cls))
    cls_open, patches_open, _ = encoder_cls_at_init("open")
    assert cls_open.std(dim=0).mean() > 0.1
    # the patch tokens keep adaLN-Zero either way (and the open CLS does not reach them at init)
    assert torch.equal(patches_open, patches)


def test_the_open_gate_is_one_plus_gate_on_the_cls_row_only():
    from sddit.models.dit import residual_gate
    gate = torch.randn(3, 4)
    assert torch.equal(residual_gate(gate, 0, 5), gate[:, None])
    opened = residual_gate(gate, 1, 5)
    assert opened.shape == (3, 5, 4)
    assert torch.equal(opened[:, 0], 1 + gate) and torch.equal(opened[:, 1:], gate[:, None].expand(3, 4, 4))


def test_family_overrides_turn_any_family_into_the_registry_s_family():
    """Every switch set whatever the family started from; the backbone and the decoder's size are the config's."""
    from sddit.config import apply_overrides, load_preset
    from sddit.models.registry import FAMILIES, SWITCH_FIELDS, family_overrides, model_config
    for start in FAMILIES:
        registered_start = model_config(f"{start}-S/2")
        base = apply_overrides(load_preset("demo"), [f"model.name={start}-S/2"] + [
            f"model.{field}={value}" for field, value in vars(registered_start).items() if field != "name"])
        for family in FAMILIES:
            turned = apply_overrides(base, [f"model.name={family}-S/2", *family_overrides(family)]).model
            registered = model_config(f"{family}-S/2")
            assert [getattr(turned, f) for f in SWITCH_FIELDS] == [getattr(registered, f) for f in SWITCH_FIELDS]
            assert turned.decoder_depth == (0 if family == "DiT" else base.model.decoder_depth)
            assert turned.hidden_size == base.model.hidden_size


def test_relative_position_bias_depends_only_on_the_offset_and_follows_the_kept_tokens():
    from sddit.models.dit import random_keep
    from sddit.models.mdt import RelativePositionAttention
    attn = RelativePositionAttention(8, 2, grid=4)
    torch.nn.init.normal_(attn.bias_table)
    bias = attn.bias()[0]                                   # [H, 16, 16] on the 4 x 4 grid
    # (0,0)->(1,1) and (2,2)->(3,3) are the same offset; (0,0)->(1,1) and (1,1)->(0,0) are not
    assert torch.equal(bias[:, 0, 5], bias[:, 10, 15]) and not torch.equal(bias[:, 0, 5], bias[:, 5, 0])
    assert len({tuple(bias[:, i, j].tolist()) for i in range(16) for j in range(16)}) == 7 * 7
    ids_keep = random_keep(3, 16, 0.5)
    kept = attn.bias(ids_keep)                              # [3, H, 8, 8]
    for n in range(3):
        assert torch.equal(kept[n], bias[:, ids_keep[n]][:, :, ids_keep[n]])
    # attending among the kept tokens is attending with their own positions' biases
    x = torch.randn(3, 16, 8)
    from sddit.models.dit import gather_tokens
    visible = gather_tokens(x, ids_keep)
    assert attn(visible, ids_keep).shape == (3, 8, 8)
    assert torch.allclose(attn(visible[:1], ids_keep[:1]), attn(visible, ids_keep)[:1], atol=1e-6)


def test_mdt_side_interpolater_keeps_the_visible_tokens_and_predicts_the_masked_ones_from_them():
    from sddit.models.dit import gather_tokens, random_keep
    model = build_from_config(tiny_config("MDT-S/2", input_size=8).model)   # 16 patches
    decoder = model.denoiser.net.decoder
    with torch.no_grad():                                   # open adaLN-Zero's gates: past the identity at init
        decoder.side_interpolater.adaLN_modulation[-1].weight.normal_(0, 0.1)
    ids_keep = random_keep(2, 16, 0.5)
    masked = torch.ones(2, 16, dtype=torch.bool).scatter_(1, ids_keep, False)
    h, c = torch.randn(2, 8, 32), torch.randn(2, 32)
    out = decoder.interpolate(h, c, ids_keep)               # [2, 16, 32]
    positions = decoder.pos_embed.expand(2, -1, -1)
    assert torch.equal(gather_tokens(out, ids_keep), h + gather_tokens(positions, ids_keep))
    fill = decoder.mask_token + positions
    assert not torch.allclose(out[masked], fill[masked])   # the masked tokens are predicted, not the fill
    nudged = h.clone()
    nudged[:, 0] += 1.0
    again = decoder.interpolate(nudged, c, ids_keep)
    assert not torch.allclose(again[masked], out[masked])  # ... from the visible ones
    first = ids_keep[:, :1]
    others = torch.ones(2, 16, dtype=torch.bool).scatter_(1, first, False) & ~masked
    assert torch.equal(again[others], out[others])          # and a visible token never changes another
