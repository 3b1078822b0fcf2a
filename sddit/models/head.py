"""DINO/iBOT projection head: the discriminative branch on top of encoder tokens."""
from __future__ import annotations

from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class ProjectionHead(nn.Module):
    """LayerNorm -> Linear-GELU-Linear-GELU-Linear -> L2 normalise -> weight-normalised Linear to K.

    The leading parameter-free LayerNorm stands in for the final norm a ViT has before its head:
    DiT blocks end without one, and adaLN-scaled tokens can be far from unit scale.
    The last layer's norm is frozen at 1 (DINO's `norm_last_layer`), which keeps the
    K-way softmax from collapsing onto a few large-norm prototypes.
    """

    def __init__(self, in_size: int, out_size: int = 8192, hidden_size: int = 2048, bottleneck_size: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(in_size, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(in_size, hidden_size), nn.GELU(),
            nn.Linear(hidden_size, hidden_size), nn.GELU(),
            nn.Linear(hidden_size, bottleneck_size),
        )
        self.last_layer = weight_norm(nn.Linear(bottleneck_size, out_size, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens):                              # tokens: [N, T, D]
        z = nn.functional.normalize(self.mlp(self.norm(tokens)), dim=-1)  # [N, T, bottleneck]
        return self.last_layer(z)                           # [N, T, K]
