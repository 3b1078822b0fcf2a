import copy

import pytest
import torch

from sddit.models import build_from_config
from sddit.objective import after_step, make_generation_ema, training_loss
from sddit.schedules import Schedules, cosine_schedule, ema_update, warmup_schedule
from sddit.training import build_training, train_step
from tests.conftest import tiny_config
from tests.test_models import masked_blocks


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


@pytest.mark.parametrize("name", ["DiT-S/2", "MaskDiT-S/2", "SD-DiT-S/2", "MDT-S/2"])
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
    diagnostics = {f"{name}_{kind}" for name in ("target_entropy", "agreement") for kind in ("cls", "patch")}
    diagnostics |= {"teacher_cls_token_std", "teacher_cls_logit_std"}
    assert set(sd.parts) == {"loss", "loss_gen", "loss_cls", "loss_patch"} | diagnostics
    expected = sd.parts["loss_gen"] + sd.parts["loss_cls"] + sd.parts["loss_patch"]
    assert torch.allclose(sd.parts["loss"], expected)
    mdt = loss_of(tiny_config("MDT-S/2"), 0)
    assert set(mdt.parts) == {"loss", "loss_gen", "loss_unmasked", "loss_masked_patches"}
    assert torch.allclose(mdt.parts["loss"], mdt.parts["loss_gen"] + mdt.parts["loss_unmasked"])
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
    after_step(model, None, out, teacher_momentum=0.9, cls_centre_momentum=0.9, patch_centre_momentum=0.9, generation_decay=0.0)
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
    after_step(model, None, out, teacher_momentum=1.0, cls_centre_momentum=0.9, patch_centre_momentum=0.9, generation_decay=1.0)
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
    assert len(s.teacher_temp) == len(s.teacher_momentum) == len(s.lr) == config.train.steps
    assert (s.lr == config.optim.lr).all()                                 # no warm-up by default
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


def test_cls_and_patch_weights_scale_their_terms():
    config = tiny_config("SD-DiT-S/2", disc_weight=0.5)
    config.disc.cls_weight, config.disc.patch_weight = 2.0, 0.25
    out = loss_of(config, 0)
    expected = out.parts["loss_gen"] + 0.5 * (2.0 * out.parts["loss_cls"] + 0.25 * out.parts["loss_patch"])
    assert torch.allclose(out.parts["loss"], expected)


def test_separate_centre_momenta():
    config = tiny_config()
    model = build_from_config(config.model)
    cls, patch = torch.randn(4, 64), torch.randn(4, 6, 64)
    out = type("Out", (), {"teacher_cls": cls, "teacher_patch": patch})()
    after_step(model, None, out, teacher_momentum=1.0, cls_centre_momentum=0.5, patch_centre_momentum=0.8,
               generation_decay=1.0)
    assert torch.allclose(model.disc.centre_cls, 0.5 * cls.mean(0))
    assert torch.allclose(model.disc.centre_patch, 0.2 * patch.reshape(-1, 64).mean(0))


def test_target_entropy_is_ln_k_for_uniform_targets_and_agreement_counts_argmax():
    from sddit.discrimination import distillation_terms
    k = 16
    teacher = torch.zeros(5, k)                     # all logits equal: uniform targets
    student = torch.randn(5, k)
    _, entropy, _ = distillation_terms(student, teacher, torch.zeros(k), 0.1, 0.05)
    assert torch.allclose(entropy, torch.log(torch.tensor(float(k))))
    sharp = torch.eye(k)[:5] * 100                  # one-hot teachers on prototypes 0..4
    matched = sharp.clone()
    matched[4] = torch.eye(k)[9] * 100              # the student disagrees on the last token
    _, entropy, agreement = distillation_terms(matched, sharp, torch.zeros(k), 0.1, 0.05)
    assert entropy < 1e-3 and torch.isclose(agreement, torch.tensor(0.8))


def test_teacher_sigma_drawn_from_the_student_distribution(monkeypatch):
    """With teacher_sigma_dist=student the teacher's c_noise varies per sample around EDM's mode."""
    import sddit.objective as objective
    config = tiny_config()
    model = build_from_config(config.model)
    seen = []
    forward = model.teacher.forward
    monkeypatch.setattr(model.teacher, "forward", lambda x, t, y: seen.append(t.clone()) or forward(x, t, y))
    x0, y = torch.randn(64, 2, 8, 8), torch.randint(0, 5, (64,))
    objective.training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09)
    config.diffusion.teacher_sigma_dist = "student"
    objective.training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09)
    fixed, drawn = seen
    assert torch.allclose(fixed, torch.full_like(fixed, float(torch.log(torch.tensor(0.002)) / 4)))
    log_sigma = 4 * drawn                            # c_noise = ln(sigma) / 4
    assert abs(float(log_sigma.mean()) - config.diffusion.p_mean) < 0.5
    assert abs(float(log_sigma.std()) - config.diffusion.p_std) < 0.4


def test_maskdit_mae_target_is_the_noisy_input(monkeypatch):
    """As in MaskDiT's loss.py: the MAE term compares D(x) with the per-patch-normalised noisy input x."""
    import sddit.objective as objective
    captured = {}
    original = objective.mae_patch_loss
    monkeypatch.setattr(objective, "mae_patch_loss",
                        lambda denoised, target, masked, p: captured.update(target=target) or original(denoised, target, masked, p))
    config = tiny_config("MaskDiT-S/2")
    config.diffusion.label_dropout = 0.0
    torch.manual_seed(0)
    model = build_from_config(config.model)
    x0, y = batch()
    generator = torch.Generator().manual_seed(3)
    objective.training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                            generator=generator)
    replay = torch.Generator().manual_seed(3)       # the loss draws sigma first, then n
    sigma = objective.sample_sigma(8, config.diffusion.p_mean, config.diffusion.p_std, generator=replay)
    noisy = x0 + sigma * torch.randn(x0.shape, generator=replay)
    assert torch.equal(captured["target"], noisy)


def test_maskdit_mask_token_has_the_decoder_width():
    model = build_from_config(tiny_config("MaskDiT-S/2").model)
    decoder = model.denoiser.net.decoder
    assert decoder.mask_token.shape[-1] == tiny_config("MaskDiT-S/2").model.decoder_hidden_size
    x, sigma = torch.randn(2, 2, 8, 8), torch.full((2, 1, 1, 1), 1.0)
    keep = torch.tensor([[0, 1], [2, 3]])
    with torch.no_grad():
        for parameter in model.parameters():        # leave DiT's zero-initialised output layer
            parameter.normal_(0.0, 0.1)
        decoder.mask_token.fill_(0.0)
        a = model.denoiser.denoise(x, sigma, torch.tensor([0, 1]), keep)[0]
        decoder.mask_token.fill_(3.0)
        b = model.denoiser.denoise(x, sigma, torch.tensor([0, 1]), keep)[0]
    assert not torch.allclose(a, b)                  # the invisible positions are the mask token's


# --- REPA ------------------------------------------------------------------------------------------------------

def test_repa_term_by_hand():
    from sddit.objective import on_token_grid, repa_loss
    aligned = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])                       # two visible tokens
    features = torch.tensor([[[5.0, 5.0], [1.0, 1.0], [9.0, 9.0], [0.0, -2.0]]])   # four positions
    keep = torch.tensor([[1, 3]])
    # cos((2, 0), (1, 1)) = 1/sqrt(2); cos((0, 3), (0, -2)) = -1
    assert repa_loss(aligned, features, keep).item() == pytest.approx(-(2 ** -0.5 - 1) / 2)
    assert repa_loss(features, features).item() == pytest.approx(-1.0)
    # a 2x2 grid of features onto a 4x4 token grid: same grid unchanged, a constant stays constant
    assert on_token_grid(features, 4) is features
    constant = torch.full((1, 4, 3), 0.7)
    assert torch.allclose(on_token_grid(constant, 16), torch.full((1, 16, 3), 0.7))
    ramp = torch.tensor([[[0.0], [1.0], [0.0], [1.0]]])                       # left column 0, right column 1
    resampled = on_token_grid(ramp, 16).reshape(4, 4)
    assert torch.equal(resampled[:, 0], torch.zeros(4)) and torch.equal(resampled[:, 3], torch.ones(4))
    assert (resampled.diff(dim=1) >= 0).all()


def repa_config(name="SD-DiT-S/2", **extra):
    return tiny_config(name, repa_weight=0.5, repa_depth=1, repa_projector_size=16, repa_feature_dim=6, **extra)


def features_for(n=8, tokens=16, dim=6, seed=3):
    return torch.randn(n, tokens, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["DiT-S/2", "MaskDiT-S/2", "SD-DiT-S/2"])
def test_repa_adds_its_term_to_every_family(name):
    config = repa_config(name)
    torch.manual_seed(0)
    model = build_from_config(config.model)
    x0, y = batch()
    plain = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                          generator=torch.Generator().manual_seed(1), features=features_for())
    assert -1.0 <= plain.parts["loss_repa"].item() <= 1.0
    others = sum(v for k, v in plain.parts.items() if k in ("loss_gen", "loss_cls", "loss_patch"))
    others = others + (0.1 * plain.parts["loss_mae"] if "loss_mae" in plain.parts else 0)
    assert torch.allclose(plain.parts["loss"], others + 0.5 * plain.parts["loss_repa"])
    # features on a coarser grid (2x2 for a 4x4 token grid) are resampled, not refused
    coarse = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                           generator=torch.Generator().manual_seed(1), features=features_for(tokens=4))
    assert torch.isfinite(coarse.parts["loss_repa"])
    with pytest.raises(ValueError, match="repa_weight > 0 needs the external features"):
        training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09)


def perturbed_model(config):
    """A model whose adaLN gates are nonzero, so every block passes gradient (at init each is the identity)."""
    torch.manual_seed(0)
    model = build_from_config(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def parameters_reached(model, value) -> set[str]:
    """Names of the trainable parameters that `value`'s gradient reaches (nonzero)."""
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    return {k for (k, _), g in zip(named, grads) if g is not None and g.abs().sum() > 0}


def test_repa_gradient_reaches_the_tapped_blocks_and_the_projector_only():
    from sddit.diffusion import sample_sigma
    from sddit.models.dit import random_keep
    from sddit.objective import repa_loss
    config = repa_config()                                  # depth 2, tapped after block 1, mask ratio 0.2
    model = perturbed_model(config)
    x0, y = batch()
    keep = random_keep(8, model.num_patches, config.model.mask_ratio, generator=torch.Generator().manual_seed(0))
    out = model(x0 + sample_sigma(8) * torch.randn_like(x0), sample_sigma(8), y, keep)
    reached = parameters_reached(model, repa_loss(out.aligned, features_for(), keep))
    assert any(k.startswith("projector.") for k in reached)
    assert any(k.startswith("denoiser.net.encoder.blocks.0.") for k in reached)
    assert "denoiser.net.encoder.x_embedder.proj.weight" in reached
    assert not any(k.startswith(("denoiser.net.encoder.blocks.1.", "denoiser.net.decoder.", "head.", "teacher."))
                   for k in reached)
    # and the generation EMA (what sampling uses) holds no projector
    assert not any("projector" in k for k in make_generation_ema(model).state_dict())


@pytest.mark.parametrize("family", ["MaskDiT-S/2", "SD-DiT-S/2"])
def test_training_loss_masks_in_the_configured_blocks(family, monkeypatch):
    import sddit.objective
    from sddit.models.dit import random_keep
    drawn = []

    def recording_keep(*args, **kwargs):
        drawn.append(random_keep(*args, **kwargs))
        return drawn[-1]
    monkeypatch.setattr(sddit.objective, "random_keep", recording_keep)
    config = tiny_config(family, input_size=16, mask_ratio=0.5, mask_block_size=2)    # 8x8 patch grid, 2x2 blocks
    torch.manual_seed(0)
    model = build_from_config(config.model)
    x0, y = torch.randn(4, 2, 16, 16), torch.randint(0, 5, (4,))
    out = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                        generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    [keep] = drawn
    assert set(masked_blocks(keep, 8, 2).unique().tolist()) == {0.0, 4.0}   # whole 2x2 blocks masked or seen


def test_lr_warms_up_linearly_from_zero_then_stays():
    config = tiny_config()
    config.optim.warmup_steps = 4
    lr = Schedules(config).lr
    assert lr[:5].tolist() == pytest.approx([config.optim.lr * k for k in (0.25, 0.5, 0.75, 1.0, 1.0)])
    assert (lr[3:] == config.optim.lr).all()
    model, optimizer, ema, schedules = build_training(config)
    x0, y = batch()
    for step in range(2):
        train_step(model, optimizer, ema, x0, y, step=step, config=config, schedules=schedules)
        assert all(group["lr"] == pytest.approx(config.optim.lr * (step + 1) / 4) for group in optimizer.param_groups)


def teacher_labels_seen(config) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_from_config(config.model)
    seen = []
    encoder_forward = model.teacher.encoder.forward
    model.teacher.encoder.forward = lambda x, t, y, *a: seen.append(y.clone()) or encoder_forward(x, t, y, *a)
    x0, y = batch()
    config.diffusion.label_dropout = 0.0
    training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                  generator=torch.Generator().manual_seed(0))
    return [seen[0], y]


def test_the_teacher_gets_the_null_label_when_teacher_label_is_off():
    config = tiny_config()
    given, labels = teacher_labels_seen(config)
    assert torch.equal(given, labels)
    config.disc.teacher_label = False
    given, _ = teacher_labels_seen(config)
    assert (given == config.model.num_classes).all()


def test_the_teachers_cls_spread_is_logged_and_zero_for_a_zero_gated_cls():
    parts = loss_of(tiny_config(cls_gate="zero"), 0).parts
    assert parts["teacher_cls_token_std"] == 0 and parts["teacher_cls_logit_std"] == 0
    parts = loss_of(tiny_config(cls_gate="open"), 0).parts
    assert parts["teacher_cls_token_std"] > 0.1 and parts["teacher_cls_logit_std"] > 0


def test_no_signal_flag_and_the_teacher_probe():
    import math

    from sddit.diagnostics import cls_carries_no_signal, nearest_class_mean_accuracy, probe_teacher_cls
    k = 64
    assert cls_carries_no_signal([math.log(k) - 0.005, math.log(k)], k)
    assert not cls_carries_no_signal([math.log(k) - 0.005, math.log(k) - 0.02], k)
    assert not cls_carries_no_signal([], k)
    # two well separated classes, interleaved so both halves hold both
    features = torch.tensor([[0.0, 0.0], [5.0, 5.0]] * 4) + 0.1 * torch.randn(8, 2)
    assert nearest_class_mean_accuracy(features, torch.tensor([0, 1] * 4)) == 1.0
    x0, y = batch()
    torch.manual_seed(0)
    probed = probe_teacher_cls(build_from_config(tiny_config(cls_gate="zero").model), x0, y, teacher_sigma=0.002,
                               teacher_temp=0.09)
    assert probed["cls_token_std"] == probed["cls_logit_std_null_label"] == 0
    # the same target for every image, whatever the label
    assert probed["target_entropy_cls"] == pytest.approx(probed["target_entropy_cls_null_label"])


def test_layersync_and_dispersive_terms_by_hand():
    import math

    from sddit.objective import dispersive_loss, layersync_loss
    shallow, deep = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), torch.tensor([[[1.0, 1.0], [0.0, 5.0]]])
    assert layersync_loss(shallow, deep).item() == pytest.approx(-(2 ** -0.5 + 1) / 2)
    # two images one unit apart in a 1-d space: the mean of exp(-d) over the 2 x 2 pairs is (2 + 2 / e) / 4
    z = torch.tensor([[0.0], [1.0]])
    assert dispersive_loss(z).item() == pytest.approx(math.log((2 + 2 / math.e) / 4))
    assert dispersive_loss(z, temperature=0.5).item() == pytest.approx(math.log((2 + 2 * math.exp(-2)) / 4))
    # distances are per flattened dimension: the same pair repeated over 4 token dims gives the same value
    assert dispersive_loss(z.repeat(1, 4).reshape(2, 2, 2)).item() == pytest.approx(math.log((2 + 2 / math.e) / 4))
    # identical representations are the worst case (0); spreading them apart lowers it
    assert dispersive_loss(torch.ones(3, 4)).item() == pytest.approx(0.0, abs=1e-7)
    assert dispersive_loss(torch.eye(3) * 10).item() < -1.0


def self_supervised_config(name="DiT-S/2", **extra):
    return tiny_config(name, depth=4, layersync_weight=0.2, dispersive_weight=0.25, **extra)


@pytest.mark.parametrize("name", ["DiT-S/2", "MaskDiT-S/2", "SD-DiT-S/2"])
def test_layersync_and_dispersive_add_their_terms_to_every_family(name):
    config = self_supervised_config(name)
    assert config.model.layersync_blocks() == (1, 2) and config.model.dispersive_block() == 4   # 8/28, 16/28 of 4
    torch.manual_seed(0)
    model = build_from_config(config.model)
    x0, y = batch()
    out = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                        generator=torch.Generator().manual_seed(1))
    # adaLN-Zero: every block is the identity at init, so the two LayerSync blocks agree exactly
    assert out.parts["loss_layersync"].item() == pytest.approx(-1.0)
    assert out.parts["loss_dispersive"].item() < 0
    others = sum(v for k, v in out.parts.items() if k in ("loss_gen", "loss_cls", "loss_patch"))
    others = others + (0.1 * out.parts["loss_mae"] if "loss_mae" in out.parts else 0)
    assert torch.allclose(out.parts["loss"], others + 0.2 * out.parts["loss_layersync"]
                          + 0.25 * out.parts["loss_dispersive"])
    # without the switches the terms are absent and the loss is the family's own
    plain = training_loss(build_from_config(tiny_config(name, depth=4).model), x0, y, diffusion=config.diffusion,
                          disc=config.disc, teacher_temp=0.09, generator=torch.Generator().manual_seed(1))
    assert not {"loss_layersync", "loss_dispersive"} & set(plain.parts)


@pytest.mark.parametrize("term, blocks", [("layersync", {0}), ("dispersive", {0, 1, 2})])
def test_self_supervision_gradient_reaches_the_blocks_up_to_its_tap_only(term, blocks):
    """LayerSync's gradient reaches the shallow block (1 of 4) and what feeds it, not the deep block it is pulled
    towards; Dispersive Loss's reaches every block up to its tap (3 of 4); neither touches the decoder."""
    from sddit.diffusion import sample_sigma
    from sddit.objective import dispersive_loss, layersync_loss
    config = tiny_config("DiT-S/2", depth=4, layersync_weight=0.2, layersync_shallow=1, layersync_deep=3,
                         dispersive_weight=0.25, dispersive_depth=3)
    model = perturbed_model(config)
    x0, y = batch()
    out = model(x0 + sample_sigma(8) * torch.randn_like(x0), sample_sigma(8), y)
    value = layersync_loss(out.hidden[1], out.hidden[3]) if term == "layersync" else dispersive_loss(out.hidden[3])
    reached = parameters_reached(model, value)
    assert {int(k.split(".")[4]) for k in reached if k.startswith("denoiser.net.encoder.blocks.")} == blocks
    assert "denoiser.net.encoder.x_embedder.proj.weight" in reached
    assert not any(k.startswith("denoiser.net.decoder.") for k in reached)


def test_sra_teacher_sigma_and_term_by_hand():
    from sddit.objective import sra_loss, sra_teacher_sigma
    sigma = torch.tensor([0.25, 1.0, 4.0, 0.001, 0.01]).reshape(5, 1, 1, 1)   # t = 0.2, 0.5, 0.8, ~0.001, ~0.01
    # no shift: the same noise level; a shift lowers t by 0.2 at most, never below EDM's sigma_min (0.002) unless
    # the student's own level is lower
    assert torch.allclose(sra_teacher_sigma(sigma, 0.0), sigma)
    shifted = sra_teacher_sigma(sigma, 0.2, generator=torch.Generator().manual_seed(0))
    t, t_shifted = sigma / (1 + sigma), shifted / (1 + shifted)
    assert ((t - t_shifted) <= 0.2 + 1e-6).all() and (shifted <= sigma + 1e-7).all() and (shifted < sigma)[:3].all()
    assert shifted[3].item() == pytest.approx(0.001) and shifted[4].item() == pytest.approx(0.002)
    # smooth L1 with beta 0.05: |d| < beta gives d^2 / (2 beta), otherwise |d| - beta / 2
    regressed, target = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.01, 0.0]]])
    assert sra_loss(regressed, target).item() == pytest.approx((0.01 ** 2 / 0.1 + (1 - 0.025)) / 2)
    assert sra_loss(regressed, torch.tensor([[[0.0, 2.0]]]), "cosine").item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", ["DiT-S/2", "SD-DiT-S/2"])
def test_sra_regresses_the_generation_ema_and_its_gradient_reaches_the_student_side_only(name):
    from sddit.diffusion import sample_sigma
    from sddit.models.dit import random_keep
    from sddit.objective import sra_loss
    config = tiny_config(name, depth=3, sra_weight=0.2, **({"disc_weight": 0.0} if name == "SD-DiT-S/2" else {}))
    assert config.model.sra_blocks() == (1, 2)
    model = perturbed_model(config)
    ema = make_generation_ema(model)
    x0, y = batch()
    out = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                        generator=torch.Generator().manual_seed(1), generation_ema=ema)
    assert torch.allclose(out.parts["loss"], out.parts["loss_gen"] + 0.2 * out.parts["loss_sra"])
    assert -1 <= out.parts["sra_cosine"].item() <= 1
    with pytest.raises(ValueError, match="needs the generation EMA"):
        training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09)
    # the term's gradient: the head and the student's blocks up to its tap, never the EMA (a frozen copy)
    keep = (random_keep(8, model.num_patches, config.model.mask_ratio, generator=torch.Generator().manual_seed(0))
            if config.model.mask_ratio > 0 else None)
    student = model(x0 + sample_sigma(8) * torch.randn_like(x0), sample_sigma(8), y, keep)
    target = torch.randn(8, student.regressed.shape[1], config.model.hidden_size)
    reached = parameters_reached(model, sra_loss(student.regressed, target))
    assert any(k.startswith("sra_head.") for k in reached)
    assert {int(k.split(".")[4]) for k in reached if k.startswith("denoiser.net.encoder.blocks.")} == {0}
    assert not any(k.startswith("denoiser.net.decoder.") for k in reached)
    assert not any(p.requires_grad for p in ema.parameters())
    assert not any("sra_head" in k for k in ema.state_dict())          # sampling is unchanged


def test_mdt_draws_each_steps_mask_ratio_and_both_passes_train_the_network(monkeypatch):
    """MDT's schedule: one mask ratio per step from U(0.3, 0.5); the side-interpolater learns only from the
    masked positions (a step whose mask keeps every token leaves it without gradient), the long skips and the
    mask token from the step."""
    from sddit import objective
    ratios, real = [], objective.random_keep
    monkeypatch.setattr(objective, "random_keep", lambda *args, **kw: ratios.append(args[2]) or real(*args, **kw))
    config = tiny_config("MDT-S/2")
    for seed in range(40):
        loss_of(config, seed)
    assert all(0.3 <= r < 0.5 for r in ratios) and max(ratios) - min(ratios) > 0.1

    def reached(**model_overrides):
        torch.manual_seed(0)
        model = build_from_config(tiny_config("MDT-S/2", **model_overrides).model)
        with torch.no_grad():                               # open the zero-initialised gates and output layer
            for name, p in model.named_parameters():
                if "adaLN_modulation" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.1)
        x0, y = batch()
        out = training_loss(model, x0, y, diffusion=config.diffusion, disc=config.disc, teacher_temp=0.09,
                            generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    both = reached()
    assert any(name.startswith("denoiser.net.decoder.side_interpolater.") for name in both)
    assert "denoiser.net.decoder.mask_token" in both and "denoiser.net.encoder.skips.0.weight" in both
    monkeypatch.setattr(objective, "random_keep", lambda batch, length, *args, **kw: torch.arange(length).expand(
        batch, -1))                                         # a 'mask' that keeps every token: no interpolation
    assert not any(name.startswith("denoiser.net.decoder.side_interpolater.") for name in reached())
