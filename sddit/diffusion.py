"""EDM (Karras et al. 2022): preconditioning, training noise distribution and loss weight, Heun sampler.

Formulas are written as in the paper (Table 1), with sigma_data = 0.5 by default.
"""
from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------------------------
# Preconditioning
# ---------------------------------------------------------------------------------------------

def edm_coefficients(sigma, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) at noise level sigma (any shape)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), around a backbone F.

    Calling it gives D(x) only, the `denoiser(x, sigma, labels)` contract of `edm_sample`;
    `denoise` also returns the backbone's encoder tokens and accepts a token mask, for training.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def denoise(self, x, sigma, labels=None, ids_keep=None):
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)           # a scalar sigma applies to every sample
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x, tokens = self.net(c_in * x, c_noise.flatten(), labels, ids_keep)
        D_x = c_skip * x + c_out * F_x[:, : x.shape[1]].float()  # learned-sigma channels are not used by EDM
        return D_x, tokens

    def forward(self, x, sigma, labels=None):
        return self.denoise(x, sigma, labels)[0]


# ---------------------------------------------------------------------------------------------
# Training: noise levels and loss weight
# ---------------------------------------------------------------------------------------------

def sample_sigma(batch: int, p_mean: float = -1.2, p_std: float = 1.2, *, device=None, generator=None):
    """ln(sigma) ~ N(P_mean, P_std^2), shaped [N, 1, 1, 1] to broadcast over images."""
    rnd_normal = torch.randn(batch, 1, 1, 1, device=device, generator=generator)
    return (rnd_normal * p_std + p_mean).exp()


def edm_loss_weight(sigma, sigma_data: float = 0.5):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which makes the loss unit-scale."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


# ---------------------------------------------------------------------------------------------
# Sampling: Heun's 2nd-order solver of the probability-flow ODE (EDM Algorithm 1, no churn)
# ---------------------------------------------------------------------------------------------

def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device=None) -> torch.Tensor:
    """sigma_0 > ... > sigma_{steps-1}, then a final 0; float64."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def edm_sample(denoiser, noise, labels=None, *, steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, cfg_scale: float = 1.0, generator=None):
    """Integrate from noise * sigma_max to sigma = 0 and return the final x_0 estimate.

    `denoiser(x, sigma, labels) -> D(x)` gets x in float64 and sigma as a 0-d float64 tensor.
    With cfg_scale != 1, D = D_uncond + cfg_scale * (D_cond - D_uncond) on all channels, where
    D_uncond = denoiser(x, sigma, None). `generator` is accepted for API stability: this solver
    is deterministic (no churn), so all randomness is in `noise`.
    """
    del generator
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    guided = cfg_scale != 1.0 and labels is not None

    def D(x, sigma):
        d_cond = denoiser(x, sigma, labels).to(torch.float64)
        if not guided:
            return d_cond
        d_uncond = denoiser(x, sigma, None).to(torch.float64)
        return d_uncond + cfg_scale * (d_cond - d_uncond)

    t_steps = karras_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device)
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - D(x_cur, t_cur)) / t_cur           # Euler step
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < steps - 1:                                   # 2nd-order correction, except onto sigma = 0
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
