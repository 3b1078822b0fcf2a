import math

import pytest
import torch

from sddit.diffusion import EDMPrecond, edm_coefficients, edm_loss_weight, edm_sample, karras_sigmas, sample_sigma


@pytest.mark.parametrize("sigma", [0.002, 0.5, 1.0, 80.0])
def test_preconditioning_values(sigma):
    s = torch.tensor(sigma, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(s, 0.5)
    assert c_skip.item() == pytest.approx(0.25 / (sigma ** 2 + 0.25))
    assert c_out.item() == pytest.approx(sigma * 0.5 / math.sqrt(sigma ** 2 + 0.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(sigma ** 2 + 0.25))
    assert c_noise.item() == pytest.approx(math.log(sigma) / 4)
    # EDM's loss weight makes lambda * c_out^2 = 1: the effective training target has unit weight
    assert (edm_loss_weight(s, 0.5) * c_out ** 2).item() == pytest.approx(1.0)


def test_preconditioning_at_sigma_half_by_hand():
    c_skip, c_out, c_in, _ = edm_coefficients(torch.tensor(0.5), 0.5)
    assert (c_skip.item(), c_out.item(), c_in.item()) == pytest.approx((0.5, 0.5 / math.sqrt(2), math.sqrt(2)))


def test_precond_wrapper_combines_skip_and_network():
    class Constant(torch.nn.Module):
        def forward(self, x, t, y, ids_keep):
            return torch.ones_like(x), None
    d = EDMPrecond(Constant())(torch.full((2, 1, 2, 2), 3.0), torch.tensor(0.5))
    assert torch.allclose(d, torch.full_like(d, 0.5 * 3.0 + 0.5 / math.sqrt(2)))


def test_sigma_sampler_is_lognormal():
    sigma = sample_sigma(200_000, -1.2, 1.2, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (200_000, 1, 1, 1)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)


def test_karras_sigmas_endpoints_and_order():
    t = karras_sigmas(18)
    assert t.dtype == torch.float64 and len(t) == 19
    assert t[0].item() == pytest.approx(80.0) and t[-2].item() == pytest.approx(0.002) and t[-1] == 0
    assert (t.diff() < 0).all()


def gaussian_denoiser(mu, std):
    """Exact D(x; sigma) = E[x0 | x] for x0 ~ N(mu, std^2) per dimension; mu may depend on the label."""
    def D(x, sigma, labels):
        m = mu(labels) if callable(mu) else mu
        return m + std ** 2 / (std ** 2 + sigma ** 2) * (x - m)
    return D


def exact_flow(noise, mu, std, sigma_max=80.0):
    """The probability-flow ODE's solution for Gaussian data, from x = noise * sigma_max to sigma = 0."""
    return mu + std / math.sqrt(std ** 2 + sigma_max ** 2) * (noise.double() * sigma_max - mu)


@pytest.mark.parametrize("steps", [40, 80])  # 18 steps, tuned for images, leaves ~10% variance error on a narrow Gaussian
def test_heun_sampler_reproduces_gaussian_data(steps):
    mu, std = 0.7, 0.3
    noise = torch.randn(40_000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x = edm_sample(gaussian_denoiser(mu, std), noise, steps=steps)
    assert x.dtype == torch.float64 and x.shape == noise.shape
    # in distribution: the data's mean and variance within sampling error (the start at mean 0
    # instead of mu biases the mean by mu * std / sigma_max = 0.0026, which is within the band)
    n = x.numel()
    assert abs(x.mean().item() - mu) < 4 * std / math.sqrt(n) + mu * std / 80.0
    assert x.var().item() == pytest.approx(std ** 2, rel=0.03)


def test_heun_sampler_converges_at_second_order_to_the_exact_flow():
    mu, std = 0.7, 0.3
    noise = torch.randn(2_000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    exact = exact_flow(noise, mu, std)
    errors = [(edm_sample(gaussian_denoiser(mu, std), noise, steps=n) - exact).abs().max().item() for n in (20, 40, 80)]
    assert errors[2] < 5e-3
    # halving the step size cuts the error ~4x for Heun (2nd order); Euler would only halve it
    assert errors[0] / errors[1] > 3.0 and errors[1] / errors[2] > 3.0


def test_sampler_with_one_step_is_a_single_euler_step_to_zero():
    noise = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    D = gaussian_denoiser(0.2, 0.5)
    x = edm_sample(D, noise, steps=1)
    expected = D(noise.double() * 80.0, torch.tensor(80.0, dtype=torch.float64), None)
    assert torch.allclose(x, expected)


def test_cfg_scale_one_equals_conditional_and_guidance_formula():
    def label_mean(labels):
        return 0.0 if labels is None else labels.double().view(-1, 1, 1, 1)

    calls = []
    conditional = gaussian_denoiser(label_mean, 0.3)

    def D(x, sigma, labels):
        calls.append(labels)
        return conditional(x, sigma, labels)

    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])
    plain = edm_sample(D, noise, labels, steps=6, cfg_scale=1.0)
    assert all(c is labels for c in calls)                  # scale 1: the conditional model alone
    assert torch.equal(plain, edm_sample(conditional, noise, labels, steps=6))
    calls.clear()
    guided = edm_sample(D, noise, labels, steps=6, cfg_scale=3.0)
    assert sum(c is None for c in calls) == sum(c is labels for c in calls) > 0
    # D_u + s (D_c - D_u) of Gaussian denoisers with means 0 and y is the denoiser with mean s * y
    expected = edm_sample(gaussian_denoiser(lambda y: 3.0 * label_mean(y), 0.3), noise, labels, steps=6)
    assert torch.allclose(guided, expected, atol=1e-9)


def test_model_denoiser_runs_in_sampler(tiny):
    from sddit.models import build_from_config
    model = build_from_config(tiny().model)
    noise = torch.randn(3, 2, 8, 8)
    x = edm_sample(model.denoiser, noise, torch.tensor([0, 1, 2]), steps=3, cfg_scale=2.0)
    assert torch.isfinite(x).all() and x.shape == noise.shape


# --- guidance conventions ------------------------------------------------------------------------------------

def label_mean(labels):
    return 0.0 if labels is None else labels.double().view(-1, 1, 1, 1)


def counting(denoiser, calls):
    def D(x, sigma, labels):
        calls.append((float(sigma), labels))
        return denoiser(x, sigma, labels)
    return D


def test_guidance_interval_guides_only_the_noise_levels_inside_it():
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 3])
    conditional = gaussian_denoiser(label_mean, 0.3)
    steps, lo, hi = 8, 0.5, 10.0
    calls = []
    inside = edm_sample(counting(conditional, calls), noise, labels, steps=steps, cfg_scale=3.0,
                        guidance_interval=(lo, hi))
    t = karras_sigmas(steps).tolist()
    evaluated = t[:steps] + t[1:steps]                      # the Euler and the correction evaluations
    assert sorted(s for s, y in calls if y is None) == sorted(s for s in evaluated if lo < s <= hi)
    assert sum(y is not None for _, y in calls) == len(evaluated)
    unguided = edm_sample(conditional, noise, labels, steps=steps)
    guided = edm_sample(conditional, noise, labels, steps=steps, cfg_scale=3.0)
    assert not torch.allclose(inside, unguided) and not torch.allclose(inside, guided)
    # an interval around every step is plain guidance; one around none is no guidance
    assert torch.equal(edm_sample(conditional, noise, labels, steps=steps, cfg_scale=3.0,
                                  guidance_interval=(0.0, 100.0)), guided)
    assert torch.equal(edm_sample(conditional, noise, labels, steps=steps, cfg_scale=3.0,
                                  guidance_interval=(100.0, 200.0)), unguided)
    with pytest.raises(ValueError, match="guidance_interval"):
        edm_sample(conditional, noise, labels, steps=2, cfg_scale=3.0, guidance_interval=(5.0, 1.0))


def test_guidance_on_the_first_channels_leaves_the_others_conditional():
    # a per-channel denoiser: channel c of the flow only sees channel c, so each channel is either
    # the guided or the unguided solution
    noise = torch.randn(4, 4, 2, 2, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2, 3])
    conditional = gaussian_denoiser(label_mean, 0.3)
    partial = edm_sample(conditional, noise, labels, steps=6, cfg_scale=2.5, guidance_channels=3)
    guided = edm_sample(conditional, noise, labels, steps=6, cfg_scale=2.5)
    unguided = edm_sample(conditional, noise, labels, steps=6)
    assert torch.equal(partial[:, :3], guided[:, :3])
    assert torch.equal(partial[:, 3:], unguided[:, 3:])


def test_batched_conditional_and_null_halves_equal_two_calls():
    null = 9

    def with_null(labels):
        return 0.0 if labels is None else torch.where(labels == null, 0, labels).double().view(-1, 1, 1, 1)

    calls = []
    D = counting(gaussian_denoiser(with_null, 0.3), calls)
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(6))
    labels = torch.tensor([0, 1, 2, 3])
    two_calls = edm_sample(gaussian_denoiser(with_null, 0.3), noise, labels, steps=5, cfg_scale=2.0)
    batched = edm_sample(D, noise, labels, steps=5, cfg_scale=2.0, null_label=null)
    assert torch.allclose(batched, two_calls, atol=1e-12)
    assert all(y is not None and len(y) == 8 and (y[4:] == null).all() for _, y in calls)   # one forward of 2N


def test_model_batched_guidance_matches_separate_calls(tiny):
    from sddit.models import build_from_config
    config = tiny().model
    model = build_from_config(config).eval()
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    noise = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2])
    separate = edm_sample(model.denoiser, noise, labels, steps=3, cfg_scale=2.0)
    batched = edm_sample(model.denoiser, noise, labels, steps=3, cfg_scale=2.0, null_label=config.num_classes)
    assert torch.allclose(batched, separate, atol=1e-4)
