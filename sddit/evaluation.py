"""The metrics of a sample set, in plain PyTorch / NumPy (no Ray): FID / sFID / IS / precision / recall
against a reference (sddit.reference) with ADM's conventions (see sddit.metrics), and class agreement for
a classifier of the dataset's classes. The samples come from sddit.sampling.
"""
from __future__ import annotations

import numpy as np
import torch

from sddit.metrics import frechet_distance, inception_score, precision_recall
from sddit.reference import FeatureAccumulator, Reference
from sddit.sampling import EvaluationError

PR_NEIGHBOURS = 3
IS_SPLIT_SIZE = 5000


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _image_batches(images, batch_size: int):
    if isinstance(images, (np.ndarray, torch.Tensor)):
        for i in range(0, len(images), batch_size):
            yield images[i:i + batch_size]
    else:
        yield from images


def compute_metrics(extractor, sample_images, reference: Reference, labels=None, *,
                    batch_size: int = 500) -> dict[str, float]:
    """FID, sFID (when both sides have spatial features), IS, precision and recall (when the reference has
    real features), and, for a classifier of the dataset's classes given the requested labels, the
    fraction of samples classified as their label. Keys end in the extractor's name.

    sample_images: uint8 NHWC array, or an iterable of such batches (streamed, e.g. iter over batch files).
    """
    suffix = extractor.name
    accumulator, logits, predicted = FeatureAccumulator(), [], []
    for images in _image_batches(sample_images, batch_size):
        outputs = extractor.extract(images)
        accumulator.add(outputs)
        logits.append(outputs["logits"])
        if "predicted" in outputs:
            predicted.append(outputs["predicted"])
    fake = accumulator.pool
    metrics = {f"fid_{suffix}": frechet_distance(reference.mu, reference.sigma, fake.mean(), fake.covariance())}
    if reference.mu_s is not None and accumulator.spatial.count > 1:
        metrics[f"sfid_{suffix}"] = frechet_distance(reference.mu_s, reference.sigma_s,
                                                     accumulator.spatial.mean(), accumulator.spatial.covariance())
    metrics[f"is_{suffix}"] = inception_score(np.concatenate(logits), split_size=IS_SPLIT_SIZE)
    if reference.features is not None and min(len(reference.features), fake.count) > PR_NEIGHBOURS:
        precision, recall = precision_recall(reference.features, np.concatenate(accumulator.kept), k=PR_NEIGHBOURS)
        metrics[f"precision_{suffix}"], metrics[f"recall_{suffix}"] = precision, recall
    elif reference.features is not None:
        print(f"evaluate: precision/recall need more than {PR_NEIGHBOURS} real and generated images; skipped",
              flush=True)
    if predicted and labels is not None:
        predicted, labels = np.concatenate(predicted), np.asarray(labels)
        if len(predicted) != len(labels):
            raise EvaluationError(f"{len(labels)} labels for {len(predicted)} samples")
        metrics[f"class_agreement_{suffix}"] = float((predicted == labels).mean())
    return {key: float(value) for key, value in metrics.items()}
