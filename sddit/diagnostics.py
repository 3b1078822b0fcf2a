"""Whether SD-DiT's CLS term carries a signal: the EMA teacher's CLS on fixed images, and the flag for a run
whose CLS targets stayed uniform.

The CLS term is a cross-entropy against softmax((teacher logits - centre) / tau). When the teacher's CLS is
the same for every image, centring removes it and every target is uniform (entropy ln K): the term then
trains nothing but the student's agreement with a constant.
"""
from __future__ import annotations

import math

import torch

from sddit.diffusion import edm_coefficients
from sddit.objective import between_image_std, unwrap

NO_SIGNAL_TOLERANCE = 0.01          # nats from ln K


def cls_carries_no_signal(target_entropies, num_prototypes: int, tolerance: float = NO_SIGNAL_TOLERANCE) -> bool:
    """True when every recorded CLS target entropy lies within `tolerance` of ln K (uniform targets throughout)."""
    values = [float(e) for e in target_entropies]
    return bool(values) and all(abs(e - math.log(num_prototypes)) <= tolerance for e in values)


def nearest_class_mean_accuracy(features, labels) -> float:
    """Accuracy of assigning each image of the second half to the nearest class mean of the first half's
    features [N, D]: how much of the class the features hold, without training a probe."""
    half = features.shape[0] // 2
    train, test, train_y, test_y = features[:half], features[half:], labels[:half], labels[half:]
    classes = train_y.unique()
    means = torch.stack([train[train_y == c].mean(dim=0) for c in classes])      # [C, D]
    predicted = classes[torch.cdist(test, means).argmin(dim=1)]
    return float((predicted == test_y).float().mean())


@torch.no_grad()
def probe_teacher_cls(model, x0, labels, *, teacher_sigma: float, teacher_temp: float, seed: int = 0) -> dict:
    """The EMA teacher on fixed clean images x0 [N, C, H, W] (labels [N]) at its own noise level, with the class
    label and with the null label: the between-image std of its CLS token and CLS logits, the entropy of the
    CLS targets the current centre gives, and the nearest-class-mean accuracy of the CLS token."""
    net = unwrap(model)
    if net.teacher is None:
        raise ValueError("the model has no teacher (model.disc_weight = 0): nothing to probe")
    n = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
    sigma = torch.full((x0.shape[0], 1, 1, 1), teacher_sigma, device=x0.device)
    _, _, c_in, c_noise = edm_coefficients(sigma, net.config.sigma_data)
    out = {}
    null = torch.full_like(labels, net.config.num_classes)
    for suffix, y in (("", labels), ("_null_label", null)):
        tokens, logits = net.teacher(c_in * (x0 + sigma * n), c_noise.flatten(), y)
        cls, cls_logits = tokens[:, 0].float(), logits[:, 0].float()
        targets = torch.softmax((cls_logits - net.disc.centre_cls) / teacher_temp, dim=-1)
        entropy = -(targets * targets.clamp_min(1e-30).log()).sum(dim=-1).mean()
        out.update({f"cls_token_std{suffix}": float(between_image_std(cls)),
                    f"cls_logit_std{suffix}": float(between_image_std(cls_logits)),
                    f"target_entropy_cls{suffix}": float(entropy),
                    f"cls_class_accuracy{suffix}": nearest_class_mean_accuracy(cls, labels)})
    return out
