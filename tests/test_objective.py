import copy

import pytest
import torch

from sddit.models import build_from_config
from sddit.objective import after_step, make_generation_ema, training_loss
from sddit.schedules import Schedules, cosine_schedule, ema_update, warmup_schedule
from sddit.training import build_training, train_step
from tests.conftest import tiny_config


def batch(seed=0, n=8, channels=2, size=8, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g) * 0.5, torch.randint(0, classes, (n,), generator=g)


def loss_of(config, seed):
    torch.manual_seed(0)
    model = build_from_config(config.model)
    x0, y = batch()
    out = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                        generator=torch.Generator().manual_seed(seed))
    return out


@pytest.mark.parametrize("name", ["DiT-S/2", "MaskDiT-S/2", "SD-DiT-S/2"])
def test_same_seed_gives_bitwise_equal_loss(name):
    config = tiny_config(name)
    a, b, c = loss_of(config, 1), loss_of(config, 1), loss_of(config, 2)
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)
    assert not torch.equal(a.loss, c.loss)


def test_loss_parts_per_family():
    assert set(loss_of(tiny_config("DiT-S/2"), 0).parts) == {"loss", "loss_gen"}
    assert set(loss_of(tiny_config("MaskDiT-S/2"), 0).parts) == {"loss", "loss_gen", "loss_mae"}
    sd = loss_of(tiny_config("SD-DiT-S/2"), 0)
    assert set(sd.parts) == {"loss", "loss_gen", "loss_cls", "loss_patch"}
    expected = sd.parts["loss_gen"] + sd.parts["loss_cls"] + sd.parts["loss_patch"]
    assert torch.allclose(sd.parts["loss"], expected)
    # without the discriminative loss SD-DiT has neither head nor teacher
    assert set(loss_of(tiny_config("SD-DiT-S/2", disc_weight=0.0), 0).parts) == {"loss", "loss_gen"}


def test_teacher_gets_no_gradient_and_changes_only_by_ema():
    config = tiny_config()
    model, optimizer, ema, schedules = build_training(config)
    teacher_before = copy.deepcopy(model.teacher.state_dict())
    x0, y = batch()
    out = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09)
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.head.parameters())
    optimizer.step()
    # the optimiser step alone leaves the teacher untouched
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    student_enc = copy.deepcopy(model.denoiser.net.encoder.state_dict())
    after_step(model, None, out, teacher_momentum=0.9, centre_momentum=0.9, generation_decay=0.0)
    for key, before in teacher_before.items():
        if key.startswith("encoder."):
            expected = 0.9 * before + 0.1 * student_enc[key[len("encoder."):]]
            assert torch.allclose(model.teacher.state_dict()[key], expected, atol=1e-7), key


def test_centre_update_arithmetic():
    config = tiny_config()
    model = build_from_config(config.model)
    cls = torch.randn(4, 64)
    patch = torch.randn(4, 6, 64)
    model.disc.centre_cls.fill_(1.0)
    out = type("Out", (), {"teacher_cls": cls, "teacher_patch": patch})()
    after_step(model, None, out, teacher_momentum=1.0, centre_momentum=0.9, generation_decay=1.0)
    assert torch.allclose(model.disc.centre_cls, 0.9 + 0.1 * cls.mean(0))
    assert torch.allclose(model.disc.centre_patch, 0.1 * patch.reshape(-1, 64).mean(0))
    assert "disc.centre_cls" in model.state_dict()          # checkpoints carry the centres


def test_centring_enters_the_teacher_targets():
    from sddit.discrimination import distillation_cross_entropy
    student = torch.randn(3, 10)
    teacher = torch.randn(3, 10)
    centre = torch.randn(10)
    a = distillation_cross_entropy(student, teacher, centre, 0.1, 0.04)
    b = distillation_cross_entropy(student, teacher - centre, torch.zeros(10), 0.1, 0.04)
    assert torch.allclose(a, b)
    p = torch.softmax((teacher - centre) / 0.04, -1)
    expected = -(p * torch.log_softmax(student / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(a, expected)


def test_ema_update_and_generation_ema_copy():
    src = torch.nn.Linear(3, 3)
    dst = copy.deepcopy(src)
    with torch.no_grad():
        src.weight.add_(1.0)
    before = dst.weight.clone()
    ema_update(dst, src, 0.75)
    assert torch.allclose(dst.weight, 0.75 * before + 0.25 * src.weight)
    model = build_from_config(tiny_config().model)
    ema = make_generation_ema(model)
    assert not any(p.requires_grad for p in ema.parameters())
    assert sum(p.numel() for p in ema.parameters()) == sum(p.numel() for p in model.denoiser.parameters())


def test_schedules():
    m = cosine_schedule(0.996, 0.999, 101)
    assert m[0] == pytest.approx(0.996) and m[-1] == pytest.approx(0.999) and m[50] == pytest.approx(0.9975)
    assert (m[1:] >= m[:-1]).all()
    t = warmup_schedule(0.09, 0.099, 10, 30)
    assert len(t) == 30 and t[0] == pytest.approx(0.09) and t[9] == pytest.approx(0.099) and (t[9:] == 0.099).all()
    config = tiny_config()
    s = Schedules(config)
    assert len(s.teacher_temp) == len(s.teacher_momentum) == config.train.steps
    assert s.generation_decay(0) == pytest.approx(0.1) and s.generation_decay(10**9) == config.ema.generation_decay


def test_nan_gradient_with_finite_loss_is_skipped():
    config = tiny_config()
    model, optimizer, ema, schedules = build_training(config)
    x0, y = batch()
    before = copy.deepcopy(model.state_dict())
    weight = model.denoiser.net.encoder.blocks[0].mlp.fc1.weight
    handle = weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    result = train_step(model, optimizer, ema, x0, y, step=0, config=config, schedules=schedules)
    handle.remove()
    assert torch.isfinite(result.parts["loss"]) and not torch.isfinite(result.grad_norm)
    assert not result.applied
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_non_finite_step_is_skipped_entirely():
    config = tiny_config()
    model, optimizer, ema, schedules = build_training(config)
    x0, y = batch()
    train_step(model, optimizer, ema, x0, y, step=0, config=config, schedules=schedules)  # optimiser state exists
    state = copy.deepcopy(model.state_dict())
    ema_state = copy.deepcopy(ema.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    bad = x0.clone()
    bad[0, 0, 0, 0] = float("nan")
    result = train_step(model, optimizer, ema, bad, y, step=1, config=config, schedules=schedules)
    assert not result.applied
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())      # incl. teacher, centres
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in ema_state.items())
    for key, saved in optimizer_state["state"].items():    # moments and step counters too
        assert all(torch.equal(v, optimizer.state_dict()["state"][key][name]) for name, v in saved.items())
    assert train_step(model, optimizer, ema, x0, y, step=1, config=config, schedules=schedules).applied


@pytest.mark.parametrize("name", ["DiT-S/2", "MaskDiT-S/2", "SD-DiT-S/2"])
def test_tiny_model_overfits_a_handful_of_latents(name):
    """Fixed noise levels make the denoising loss comparable across steps; it must fall well below
    its starting value (about 1: EDM's weighting makes an untrained model's loss unit-scale)."""
    torch.manual_seed(0)
    config = tiny_config(name, hidden_size=64, num_heads=4, decoder_hidden_size=64)
    config.optim.lr = 3e-3
    config.train.steps = 400
    config.diffusion.label_dropout = 0.0
    config.diffusion.p_std = 0.3
    config.ema.generation_decay = 0.0
    model, optimizer, ema, schedules = build_training(config)
    x0, y = batch(n=4)
    probe = torch.Generator()

    def probe_loss():
        probe.manual_seed(123)
        with torch.no_grad():
            return training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc,
                                 teacher_temp=0.09, generator=probe).parts["loss_gen"].item()

    start = probe_loss()
    for step in range(config.train.steps):
        train_step(model, optimizer, ema, x0, y, step=step, config=config, schedules=schedules)
    assert probe_loss() < 0.25 * start
