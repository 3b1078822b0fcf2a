"""Resolution transfer: the position table resampled onto the source grid, the weights carried over, the
training noise levels scaled, the guidance-scale law."""
import dataclasses

import numpy as np
import pytest
import torch

from sddit.config import Config
from sddit.diffusion import sample_sigma
from sddit.models import build_from_config
from sddit.models.dit import sincos_1d, sincos_2d
from sddit.objective import training_loss
from sddit.sampling import EvaluationError, SamplingPlan
from sddit.transfer import load_weights, position_span, transfer_config
from tests.conftest import tiny_config


def test_a_grid_resampled_onto_a_smaller_span_takes_cell_centre_positions():
    # a 4x4 grid over a 2x2 span: cell centres (i + 1/2) 2/4 - 1/2 = -0.25, 0.25, 0.75, 1.25
    table = sincos_2d(8, 4, span=2)
    positions = np.array([-0.25, 0.25, 0.75, 1.25])
    assert np.allclose(table[:4, :4], sincos_1d(4, positions))              # the first row: columns vary
    assert np.allclose(table[::4, 4:], sincos_1d(4, positions))             # the first column: rows vary
    assert np.allclose(table[:, 0], np.sin(np.tile(positions, 4)))          # the fastest channel, by hand
    assert np.array_equal(sincos_2d(8, 4, span=4), sincos_2d(8, 4))         # its own span: DiT's table


def transfer_pair(name: str):
    """A model at 8x8 latents (a 4x4 patch grid) and the config of the same model at 16x16."""
    low = tiny_config(name, input_size=8)
    high = tiny_config(name, input_size=16)
    return low, high


@pytest.mark.parametrize("name", ["SD-DiT-S/2", "MaskDiT-S/2", "DiT-S/2"])
def test_weights_of_another_resolution_initialise_the_model_with_resampled_positions(name):
    low, high = transfer_pair(name)
    torch.manual_seed(0)
    source = build_from_config(low.model)
    high = transfer_config(high, low)
    assert high.model.pos_embed_grid == 4 and position_span(high.model) == 4
    torch.manual_seed(1)
    target = build_from_config(high.model)
    load_weights(target, source.state_dict())
    for key, value in target.state_dict().items():
        if key.endswith("pos_embed"):
            width = value.shape[-1]
            assert torch.allclose(value[0], torch.from_numpy(sincos_2d(width, 8, span=4)).float())
        else:
            assert torch.equal(value, source.state_dict()[key]), key
    x = torch.randn(2, 2, 16, 16)
    out = target(x, torch.full((2, 1, 1, 1), 1.0), torch.tensor([0, 1]))
    assert out.denoised.shape == x.shape and torch.isfinite(out.denoised).all()


def test_the_same_grid_or_a_named_span_is_left_alone():
    low, high = transfer_pair("SD-DiT-S/2")
    assert transfer_config(low, low) is low
    named = dataclasses.replace(high, model=dataclasses.replace(high.model, pos_embed_grid=6))
    assert transfer_config(named, low).model.pos_embed_grid == 6
    # a transferred run resumed: its own checkpoint says the span, so it stays
    transferred = transfer_config(high, low)
    assert transfer_config(high, transferred).model.pos_embed_grid == 4


def test_weights_of_another_architecture_are_refused_by_name():
    low, _ = transfer_pair("SD-DiT-S/2")
    other = build_from_config(tiny_config("DiT-S/2", input_size=8).model)
    with pytest.raises(RuntimeError, match="missing .*head"):
        load_weights(build_from_config(low.model), other.state_dict())


class RecordSigma(torch.nn.Module):
    """Wraps a model as DDP does (`.module`) and records the sigma of each training call."""

    def __init__(self, module):
        super().__init__()
        self.module, self.sigmas = module, []

    def forward(self, x, sigma, labels=None, ids_keep=None):
        self.sigmas.append(sigma.flatten().clone())
        return self.module(x, sigma, labels, ids_keep)


def test_sigma_scale_multiplies_the_training_noise_levels():
    config = tiny_config("DiT-S/2")
    model = RecordSigma(build_from_config(config.model))
    x0, y = torch.randn(16, 2, 8, 8), torch.randint(0, 5, (16,))
    for scale in (1.0, 2.0):
        diffusion = dataclasses.replace(config.diffusion, sigma_scale=scale)
        training_loss(model, x0, y, diffusion=diffusion, disc=config.disc, teacher_temp=0.09,
                      generator=torch.Generator().manual_seed(7))
    plain, scaled = model.sigmas
    assert torch.allclose(scaled, 2.0 * plain)
    # ln(sigma) ~ N(p_mean + ln 2, p_std^2): the same as moving p_mean, by construction of the draw
    moved = sample_sigma(16, config.diffusion.p_mean + np.log(2.0), config.diffusion.p_std,
                         generator=torch.Generator().manual_seed(7))
    assert torch.allclose(scaled, moved.flatten(), rtol=1e-5)


def test_sigma_scale_must_be_positive():
    config = Config()
    config.diffusion.sigma_scale = 0.0
    with pytest.raises(Exception, match="diffusion.sigma_scale"):
        config.validate()


@pytest.mark.parametrize("cfg_scale, factor, used", [(4.0, 0.5, 2.5), (1.5, 1.0, 1.5), (1.0, 3.0, 1.0),
                                                     (3.0, 0.0, 1.0)])
def test_guidance_factor_follows_the_transfer_law(cfg_scale, factor, used):
    plan = SamplingPlan(10, 5, 10, (4, 8, 8), cfg_scale=cfg_scale, guidance_factor=factor)
    assert plan.guidance_scale == pytest.approx(used)                         # 1 + s (lambda - 1)
    assert plan.to_dict()["guidance_factor"] == factor                        # recorded with the samples
    with pytest.raises(EvaluationError, match="guidance_factor"):
        SamplingPlan(10, 5, 10, (4, 8, 8), guidance_factor=-1.0)


def test_the_sampler_uses_the_transferred_scale():
    from sddit.codecs import make_codec
    from sddit.sampling import sample_batch
    torch.manual_seed(0)
    config = tiny_config("DiT-S/2", in_channels=3)
    denoiser = build_from_config(config.model).denoiser.eval()
    for p in denoiser.parameters():                          # adaLN-Zero starts at zero: give the label a say
        p.data.add_(0.05 * torch.randn_like(p))
    codec = make_codec("pixel")

    def draw(**options):
        return sample_batch(denoiser, codec, 0, SamplingPlan(4, 4, 5, (3, 8, 8), steps=3, **options))[0]

    transferred = draw(cfg_scale=4.0, guidance_factor=0.5)
    assert np.array_equal(transferred, draw(cfg_scale=2.5))
    assert not np.array_equal(transferred, draw(cfg_scale=4.0))
