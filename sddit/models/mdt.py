"""MDT's backbone (Gao et al. 2023, Masked Diffusion Transformer; its v2 code): the encoder and decoder that
`Backbone` uses when `model.backbone = mdt`.

What differs from DiT's: every attention adds a learned relative-position bias; the position embeddings are
learned (sine-cosine at init); the encoder's second half takes long skips from its first half (U-Net style,
through a Linear of the concatenation); and the decoder, at the encoder's width, starts with the
side-interpolater when tokens were masked, a block over the whole grid that predicts the masked positions'
tokens from the visible ones (a learned mask token fills them first) and leaves the visible ones as they came,
then runs its blocks, each taking a long skip from the embedded input. Without a mask (sampling, and MDT's
unmasked pass) the side-interpolater is skipped.

Reading order: relative-position attention, the block with a skip, encoder, decoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from sddit.models.dit import (DiTBlock, Encoder, LabelEmbedder, ModulatedLinear, TimestepEmbedder, gather_tokens,
                              scatter_tokens)


# ---------------------------------------------------------------------------------------------
# Attention with a learned bias per head and relative offset on the patch grid
# ---------------------------------------------------------------------------------------------

class RelativePositionAttention(nn.Module):
    """Multi-head self-attention whose logits get a learned bias per head for each (row, column) offset between
    two patches of the grid x grid patch grid; with `ids_keep`, only the kept patches attend, with their biases."""

    def __init__(self, dim: int, num_heads: int, grid: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, num_heads))
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        offset = (rows[:, None] - rows[None, :] + grid - 1) * (2 * grid - 1) + cols[:, None] - cols[None, :] + grid - 1
        self.register_buffer("offset_index", offset, persistent=False)      # [L, L] into the table

    def bias(self, ids_keep=None):
        """[1, H, L, L], or [N, H, K, K] between the kept patches."""
        bias = self.bias_table[self.offset_index].permute(2, 0, 1)[None]  # [1, H, L, L]
        if ids_keep is None:
            return bias
        n, k = ids_keep.shape
        rows = bias.expand(n, -1, -1, -1).gather(2, ids_keep[:, None, :, None].expand(-1, self.num_heads, -1,
                                                                                      bias.shape[-1]))
        return rows.gather(3, ids_keep[:, None, None, :].expand(-1, self.num_heads, k, -1))

    def forward(self, x, ids_keep=None):                    # x: [N, T, D]
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias(ids_keep).to(q.dtype))   # [N, H, T, D/H]
        return self.proj(h.transpose(1, 2).reshape(n, t, d))


def mdt_block(hidden_size: int, num_heads: int, mlp_ratio: float, grid: int) -> DiTBlock:
    """A DiT block (adaLN-Zero) whose attention has MDT's relative-position bias."""
    return DiTBlock(hidden_size, hidden_size, num_heads, mlp_ratio,
                    attn=RelativePositionAttention(hidden_size, num_heads, grid))


def skip_in(h, skip, linear: nn.Linear):                  # h, skip: [N, T, D]
    """A long skip joining the stream: Linear(concat) back to the width."""
    return linear(torch.cat([h, skip], dim=-1))


# ---------------------------------------------------------------------------------------------
# Encoder: embedders, then blocks whose second half takes long skips from the first
# ---------------------------------------------------------------------------------------------

class MDTEncoder(nn.Module):
    """The same interface as DiT's `Encoder` (no CLS: MDT has no discriminative branch)."""

    num_extra_tokens = 0
    cls_token = None

    def __init__(self, *, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio,
                 num_classes):
        super().__init__()
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size))    # learned
        self.blocks = nn.ModuleList(mdt_block(hidden_size, num_heads, mlp_ratio, grid) for _ in range(depth))
        self.skips = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth // 2))

    condition = Encoder.condition                           # c = t embedding + y embedding, as DiT's

    def forward(self, x, t, y, ids_keep=None, taps=()):
        """x: [N, C, H, W] -> (tokens [N, K, D], c [N, D], all embedded patches [N, L, D],
        {depth: the patch tokens after that many blocks [N, K, D]} for each depth in `taps`)."""
        patches = self.x_embedder(x) + self.pos_embed       # [N, L, D]
        c = self.condition(t, y)
        h = patches if ids_keep is None else gather_tokens(patches, ids_keep)  # [N, K, D]
        half, saved, tapped = len(self.blocks) // 2, [], {}
        for depth, block in enumerate(self.blocks, start=1):
            if depth > half:                                # the second half: the mirror block's output joins
                h = skip_in(h, saved.pop(), self.skips[depth - half - 1])
            h = block(h, c, ids_keep=ids_keep)
            if depth <= half:
                saved.append(h)
            if depth in taps:
                tapped[depth] = h
        return h, c, patches, tapped


# ---------------------------------------------------------------------------------------------
# Decoder: the side-interpolater (masked steps only), then blocks with a skip from the embedded input
# ---------------------------------------------------------------------------------------------

class MDTDecoder(nn.Module):
    def __init__(self, *, num_patches, patch_size, out_channels, hidden_size, depth, num_heads, mlp_ratio, grid):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))     # learned
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.side_interpolater = mdt_block(hidden_size, num_heads, mlp_ratio, grid)
        self.blocks = nn.ModuleList(mdt_block(hidden_size, num_heads, mlp_ratio, grid) for _ in range(depth))
        self.skips = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth))
        self.final_layer = ModulatedLinear(hidden_size, hidden_size, patch_size * patch_size * out_channels)

    def interpolate(self, h, c, ids_keep):                  # h: visible tokens [N, K, D]
        """The whole grid [N, L, D]: the visible tokens as they came, the masked ones predicted from them."""
        fill = self.mask_token.to(h.dtype).expand(h.shape[0], self.pos_embed.shape[1], -1)
        h = scatter_tokens(fill, h, ids_keep) + self.pos_embed
        predicted = self.side_interpolater(h, c)
        return scatter_tokens(predicted, gather_tokens(h, ids_keep), ids_keep)

    def forward(self, h, c, patches, ids_keep=None):
        """h: encoder tokens [N, K, D] -> per-patch predictions [N, L, p*p*C]."""
        h = self.interpolate(h, c, ids_keep) if ids_keep is not None else h + self.pos_embed
        for block, skip in zip(self.blocks, self.skips):
            h = block(skip_in(h, patches, skip), c)
        return self.final_layer(h, c)
