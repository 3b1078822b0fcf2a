"""DiT backbone split into an encoder and a decoder, so SD-DiT's teacher can copy the encoder alone.

Reading order: embedders, position embeddings, token masking, block, final layer, encoder,
decoder, backbone. The backbone is the EDM network F: it sees c_in * x and c_noise, never sigma
itself (preconditioning lives in `sddit.diffusion`).

With `decoder_depth=0` and no mask, encoder + final layer is exactly the reference DiT.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def residual_gate(gate, open_tokens: int, length: int):
    """adaLN-Zero's per-sample gate [N, D] for a sequence of `length` tokens: [N, 1, D], or [N, T, D] where the
    first `open_tokens` rows get 1 + gate, an ordinary pre-LN residual at init (the CLS under cls_gate=open)."""
    gate = gate.unsqueeze(1)
    if open_tokens == 0:
        return gate
    is_open = (torch.arange(length, device=gate.device) < open_tokens).to(gate.dtype)
    return gate + is_open[None, :, None]


# ---------------------------------------------------------------------------------------------
# Embedders for the noise level and the class label
# ---------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the scalar noise label (EDM's c_noise), then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        half = frequency_size // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):                                   # t: [N]
        args = t.float()[:, None] * self.freqs[None]        # [N, F/2]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # [N, D]


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class used for classifier-free guidance.

    Label dropout is not done here: the training loss replaces labels by `null_class` explicitly,
    so the randomness is drawn from the same generator as everything else.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.null_class = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):                                   # y: [N] int, or None
        return self.embedding_table(y)                      # [N, D]


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sine-cosine position embeddings (as in MAE / DiT)
# ---------------------------------------------------------------------------------------------

def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)  # [M, dim]


def sincos_2d(dim: int, grid_size: int, span: int | None = None) -> np.ndarray:
    """[grid_size**2, dim]: half the channels encode the row, half the column.

    `span`: the grid side the positions cover. A grid of another size is resampled onto it, cell centres
    to cell centres (position (i + 1/2) span / grid - 1/2), so a model trained on a span x span grid sees
    the positions it knows, interpolated, rather than new ones beyond its range (resolution transfer).
    """
    span = grid_size if span is None else span
    coords = (np.arange(grid_size, dtype=np.float64) + 0.5) * span / grid_size - 0.5
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, matching row-major patches
    return np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)


# ---------------------------------------------------------------------------------------------
# Token masking: keep a random subset per sample, then put the rest back
# ---------------------------------------------------------------------------------------------

def random_keep(batch: int, length: int, mask_ratio: float, *, block_size: int = 1, crop: bool = False,
                device=None, generator=None):
    """Indices [N, int(L * (1 - r))] of the visible tokens, sorted, drawn independently per sample.

    block_size b > 1 masks in blocks of b x b patches (MaskDM's block-wise masks) on the sqrt(L) x sqrt(L)
    grid: the blocks take a random order and become visible whole, in that order, until the count is
    reached; the block at the boundary is split at random, so every sample keeps exactly the same number
    of tokens (a batch needs that). Edge blocks of a grid that b does not divide are smaller.
    crop keeps one window instead (MaskDM's crop masks): K visible tokens fill a ceil(sqrt(K))-sided square
    at a random place row by row, so the last row of the window may be partial and every sample keeps K.
    """
    num_keep = int(length * (1 - mask_ratio))
    scores = torch.rand(batch, length, device=device, generator=generator)     # [N, L] in [0, 1)
    if crop:
        grid = math.isqrt(length)
        side = math.isqrt(max(num_keep - 1, 0)) + 1                          # ceil(sqrt(K)) for K >= 1
        corner = torch.randint(0, grid - side + 1, (2, batch, 1), device=device, generator=generator)
        token = torch.arange(length, device=device)
        row, col = token // grid - corner[0], token % grid - corner[1]     # [N, L] inside the window
        inside = (row >= 0) & (row < side) & (col >= 0) & (col < side)
        scores = torch.where(inside, (row * side + col).float(), float(length) + scores)
    elif block_size > 1:
        grid = math.isqrt(length)
        block_row = torch.arange(grid, device=device) // block_size
        per_row = -(-grid // block_size)
        block_of = (block_row[:, None] * per_row + block_row[None, :]).flatten()   # [L], row-major tokens
        order = torch.rand(batch, per_row ** 2, device=device, generator=generator).argsort(dim=1)
        rank = order.argsort(dim=1)                                                 # [N, blocks]
        scores = scores + rank[:, block_of]         # sorts by block rank first, then at random inside a block
    return scores.argsort(dim=1)[:, :num_keep].sort(dim=1).values


def gather_tokens(x, ids):                                  # x: [N, L, D], ids: [N, K]
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]


def scatter_tokens(fill, x_visible, ids):
    """Write the visible tokens back into `fill` ([N, L, D]) at positions `ids`."""
    return fill.scatter(1, ids.unsqueeze(-1).expand(-1, -1, fill.shape[-1]), x_visible)


# ---------------------------------------------------------------------------------------------
# DiT block with adaLN-Zero conditioning, and the final layer
# ---------------------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    """`attn`: another attention than timm's (MDT's, with a relative-position bias); what the block's forward
    gets beyond x and c goes to it."""

    def __init__(self, hidden_size: int, cond_size: int, num_heads: int, mlp_ratio: float = 4.0,
                 attn: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = attn if attn is not None else Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 6 * hidden_size))

    def forward(self, x, c, open_tokens: int = 0, **attn_options):   # x: [N, T, D], c: [N, C]
        """`open_tokens`: leading rows (the CLS) whose residual paths are open at init rather than zero-gated."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        gate_msa, gate_mlp = (residual_gate(gate, open_tokens, x.shape[1]) for gate in (gate_msa, gate_mlp))
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), **attn_options)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class ModulatedLinear(nn.Module):
    """adaLN-modulated LayerNorm then a Linear: DiT's final layer, and the encoder-to-decoder bridge."""

    def __init__(self, in_size: int, cond_size: int, out_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * in_size))
        self.linear = nn.Linear(in_size, out_size)

    def forward(self, x, c):                                # x: [N, T, in], c: [N, C]
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # [N, T, out]


# ---------------------------------------------------------------------------------------------
# Encoder (what the teacher copies) and decoder
# ---------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """Patch embedding, t/y embedding, optional CLS token and the DiT blocks.

    `cls_gate`: "zero" gates the CLS row like every patch token (adaLN-Zero: each block is the identity at init,
    so the CLS leaves the encoder as the same learned vector for every image); "open" gives the CLS row
    1 + gate, so at init it is an ordinary pre-LN ViT token that attends to the image, as DINO's and iBOT's CLS.
    """

    def __init__(self, *, input_size, patch_size, in_channels, hidden_size, depth, num_heads,
                 mlp_ratio, num_classes, cls_token, cls_gate):
        super().__init__()
        self.open_tokens = 1 if cls_token and cls_gate == "open" else 0
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if cls_token else None
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, hidden_size, num_heads, mlp_ratio) for _ in range(depth))

    @property
    def num_extra_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def condition(self, t, y):                              # t: [N], y: [N] or None
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                y = torch.full_like(t, self.y_embedder.null_class, dtype=torch.long)
            c = c + self.y_embedder(y)
        return c                                            # [N, D]

    def forward(self, x, t, y, ids_keep=None, taps=()):
        """x: [N, C, H, W] -> (tokens [N, extra + K, D], c [N, D], all embedded patches [N, L, D],
        {depth: the patch tokens after that many blocks [N, K, D]} for each depth in `taps`)."""
        patches = self.x_embedder(x) + self.pos_embed       # [N, L, D]
        c = self.condition(t, y)
        h = patches if ids_keep is None else gather_tokens(patches, ids_keep)  # [N, K, D]
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        tapped = {}
        for depth, block in enumerate(self.blocks, start=1):
            h = block(h, c, self.open_tokens)
            if depth in taps:
                tapped[depth] = h[:, self.num_extra_tokens:]
        return h, c, patches, tapped


class Decoder(nn.Module):
    """Puts the invisible tokens back, then (optionally) a light DiT, then the final layer.

    SD-DiT fills the invisible positions with the encoder's embedded *noisy* patches, then bridges
    every token to the decoder's width. MaskDiT, as its reference code does, bridges the visible
    tokens and fills the invisible ones with a learned mask token of the decoder's width. With
    `depth=0` this is DiT's final layer alone.
    """

    def __init__(self, *, num_patches, patch_size, out_channels, encoder_size, depth, hidden_size,
                 num_heads, mlp_ratio, mask_token):
        super().__init__()
        final_size = encoder_size
        self.bridge = self.pos_embed = None
        if depth > 0:
            self.bridge = ModulatedLinear(encoder_size, encoder_size, hidden_size)
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
            final_size = hidden_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, final_size)) if mask_token else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, encoder_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = ModulatedLinear(final_size, encoder_size, patch_size * patch_size * out_channels)

    def forward(self, h, c, patches, ids_keep=None):
        """h: encoder patch tokens [N, K, D] (no CLS) -> per-patch predictions [N, L, p*p*C]."""
        if ids_keep is not None and self.mask_token is None:
            h = scatter_tokens(patches.to(h.dtype), h, ids_keep)          # [N, L, D]
        if self.bridge is not None:
            h = self.bridge(h, c)                                         # [N, L or K, D_dec]
        if ids_keep is not None and self.mask_token is not None:
            fill = self.mask_token.to(h.dtype).expand(h.shape[0], patches.shape[1], -1)
            h = scatter_tokens(fill, h, ids_keep)                         # [N, L, D_dec]
        if self.pos_embed is not None:
            h = h + self.pos_embed
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)


# ---------------------------------------------------------------------------------------------
# Backbone: encoder + decoder, the EDM network F
# ---------------------------------------------------------------------------------------------

class Backbone(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.position_span = config.pos_embed_grid or config.input_size // config.patch_size
        if config.backbone == "mdt":
            self.encoder, self.decoder = mdt_parts(config, self.out_channels)
            return
        self.encoder = Encoder(
            input_size=config.input_size, patch_size=config.patch_size, in_channels=config.in_channels,
            hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio, num_classes=config.num_classes, cls_token=config.cls_token,
            cls_gate=config.cls_gate,
        )
        self.decoder = Decoder(
            num_patches=self.encoder.x_embedder.num_patches, patch_size=config.patch_size,
            out_channels=self.out_channels, encoder_size=config.hidden_size, depth=config.decoder_depth,
            hidden_size=config.decoder_hidden_size, num_heads=config.decoder_num_heads,
            mlp_ratio=config.mlp_ratio, mask_token=config.mask_token,
        )

    def unpatchify(self, x):                                # [N, L, p*p*C] -> [N, C, H, W]
        p, c = self.patch_size, self.out_channels
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, side * p, side * p)

    def forward(self, x, t, y=None, ids_keep=None, taps=()):
        """F(c_in x, c_noise, y) -> (prediction [N, C_out, H, W], encoder tokens [N, extra + K, D],
        {depth: the encoder's patch tokens after that many blocks [N, K, D]} for each depth in `taps`)."""
        tokens, c, patches, tapped = self.encoder(x, t, y, ids_keep, taps)
        out = self.decoder(tokens[:, self.encoder.num_extra_tokens:], c, patches, ids_keep)
        return self.unpatchify(out), tokens, tapped


def mdt_parts(config, out_channels: int):
    """MDT's encoder and decoder (sddit/models/mdt.py, which builds on this file's blocks: imported here)."""
    from sddit.models.mdt import MDTDecoder, MDTEncoder
    grid = config.input_size // config.patch_size
    encoder = MDTEncoder(input_size=config.input_size, patch_size=config.patch_size, in_channels=config.in_channels,
                         hidden_size=config.hidden_size, depth=config.depth, num_heads=config.num_heads,
                         mlp_ratio=config.mlp_ratio, num_classes=config.num_classes)
    decoder = MDTDecoder(num_patches=grid * grid, patch_size=config.patch_size, out_channels=out_channels,
                         hidden_size=config.hidden_size, depth=config.decoder_depth, num_heads=config.num_heads,
                         mlp_ratio=config.mlp_ratio, grid=grid)
    return encoder, decoder


# ---------------------------------------------------------------------------------------------
# Initialisation, all in one place
# ---------------------------------------------------------------------------------------------

def initialize_backbone(net: Backbone) -> None:
    """DiT's scheme: xavier Linear, N(0, 0.02) embeddings, zeroed adaLN gates and output layer."""
    def basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    net.apply(basic_init)

    enc, dec = net.encoder, net.decoder
    grid = int(enc.x_embedder.num_patches ** 0.5)
    for pos_embed in (enc.pos_embed, dec.pos_embed):
        if pos_embed is not None:
            table = sincos_2d(pos_embed.shape[-1], grid, net.position_span)
            pos_embed.data.copy_(torch.from_numpy(table).float()[None])

    w = enc.x_embedder.proj.weight.data                     # initialise the conv like a Linear
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(enc.x_embedder.proj.bias)
    if enc.y_embedder is not None:
        nn.init.normal_(enc.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(enc.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(enc.t_embedder.mlp[2].weight, std=0.02)
    for token in (enc.cls_token, dec.mask_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)

    side = getattr(dec, "side_interpolater", None)         # MDT's
    for block in [*enc.blocks, *dec.blocks, *([side] if side is not None else [])]:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
        if hasattr(block.attn, "bias_table"):               # MDT's relative-position bias, as BEiT's
            nn.init.trunc_normal_(block.attn.bias_table, std=0.02)
    nn.init.zeros_(dec.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(dec.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(dec.final_layer.linear.weight)
    nn.init.zeros_(dec.final_layer.linear.bias)
