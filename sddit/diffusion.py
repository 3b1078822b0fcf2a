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
    `denoise` also returns what else the backbone returns (its encoder tokens, and the tapped hidden
    tokens when asked) and passes a token mask and the depths to tap through, for training.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def denoise(self, x, sigma, labels=None, ids_keep=None, **backbone_options):
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)           # a scalar sigma applies to every sample
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x, *rest = self.net(c_in * x, c_noise.flatten(), labels, ids_keep, **backbone_options)
        D_x = c_skip * x + c_out * F_x[:, : x.shape[1]].float()  # learned-sigma channels are not used by EDM
        return (D_x, *rest)

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


def guide(d_cond, d_uncond, scale: float, channels: int | None = None):
    """Classifier-free guidance D_u + s (D_c - D_u), on the first `channels` channels only when given
    (DiT's released numbers guide 3 of the 4 latent channels); the others keep D_c."""
    d = d_uncond + scale * (d_cond - d_uncond)
    if channels is None:
        return d
    return torch.cat([d[:, :channels], d_cond[:, channels:]], dim=1)


@torch.no_grad()
def edm_sample(denoiser, noise, labels=None, *, steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0, cfg_scale: float = 1.0, guidance_interval=None,
               guidance_channels: int | None = None, null_label: int | None = None, generator=None):
    """Integrate from noise * sigma_max to sigma = 0 and return the final x_0 estimate.

    `denoiser(x, sigma, labels) -> D(x)` gets x in float64 and sigma as a 0-d float64 tensor.
    With cfg_scale != 1, D = D_uncond + cfg_scale * (D_cond - D_uncond) (see `guide`), where D_uncond
    is the denoiser given no labels, or, with `null_label`, given that label in the same batched call
    as the conditional half (one forward of 2N instead of two of N). `guidance_interval=(lo, hi)`
    guides only at noise levels lo < sigma <= hi (Kynkaenniemi et al. 2024) and evaluates the
    conditional half alone elsewhere. The step schedule and which steps are guided are decided on the
    host before the loop, so the loop never waits on the device. `generator` is accepted for API
    stability: this solver is deterministic (no churn), so all randomness is in `noise`.
    """
    del generator
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if guidance_interval is not None and not 0 <= guidance_interval[0] < guidance_interval[1]:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo < hi, got {guidance_interval}")
    t_host = karras_sigmas(steps, sigma_min, sigma_max, rho)
    wants_guidance = cfg_scale != 1.0 and labels is not None

    def guided_at(sigma: float) -> bool:
        if not wants_guidance:
            return False
        return guidance_interval is None or guidance_interval[0] < sigma <= guidance_interval[1]

    def D(x, sigma, guided: bool):
        if not guided:
            return denoiser(x, sigma, labels).to(torch.float64)
        if null_label is None:
            d_cond, d_uncond = denoiser(x, sigma, labels), denoiser(x, sigma, None)
        else:
            both = denoiser(torch.cat([x, x]), sigma, torch.cat([labels, torch.full_like(labels, null_label)]))
            d_cond, d_uncond = both.chunk(2)
        return guide(d_cond.to(torch.float64), d_uncond.to(torch.float64), cfg_scale, guidance_channels)

    t_steps = t_host.to(noise.device)
    x_next = noise.to(torch.float64) * t_steps[0]
    for i in range(steps):
        x_cur, t_cur, t_next = x_next, t_steps[i], t_steps[i + 1]
        d_cur = (x_cur - D(x_cur, t_cur, guided_at(float(t_host[i])))) / t_cur      # Euler step
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < steps - 1:                                   # 2nd-order correction, except onto sigma = 0
            d_prime = (x_next - D(x_next, t_next, guided_at(float(t_host[i + 1])))) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
