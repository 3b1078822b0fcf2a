"""Feature extractors behind the evaluation metrics: one interface, two networks.

`extract(images)` takes uint8 NHWC images and returns a dict with
  pool     [N, D]     features for FID and precision/recall,
  logits   [N, K]     class logits for the Inception Score,
  spatial  [N, 2023]  sFID features, or None when the network has no such layer,
and, for classifiers of the dataset's own classes, predicted [N] (the arg-max class).
Each extractor has a `name` (it goes into metric names: fid_<name>) and a `weights_checksum`
(reference statistics are cached under it, so other weights never reuse them).

`InceptionExtractor` is the FID Inception-v3, i.e. the TensorFlow graph of 2015-12-05 that the ADM
evaluator runs: torch-fidelity's `FeatureExtractorInceptionV3` (the graph's layers, its TF1 bilinear resize,
pool_3 and the bias-free logits) with the weights pytorch-fid ported from that graph, read from a local file.
This module adds the sFID layer, the weights checksum and the errors that name the missing file.
`DomainExtractor` is a small CNN trained on the dataset itself, for data where ImageNet features
mean nothing (the demo's digits).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torchvision.models.inception import Inception3

from sddit.data import file_sha256, write_atomically
from sddit.errors import UserError
from sddit.metrics import sfid_features

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"       # torch.hub convention: the hex in the file name starts its sha256
WEIGHTS_ENV = "SDDIT_INCEPTION_WEIGHTS"
DOMAIN_CACHE_FILE = "domain_classifier.pt"
DOMAIN_CACHE_FORMAT = 3          # 2: low / high stages for sFID features; 3: rows in content order


class ExtractorError(UserError, RuntimeError):
    """A feature extractor cannot be built; the message names the missing or wrong asset and the fix."""


def state_dict_sha256(module: nn.Module) -> str:
    """A checksum of a module's weights (names and bytes), for weights that were never a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _full_float32():
    # PyTorch lets cuDNN convolutions use TF32 by default on Ampere and newer; the TF evaluator computes in
    # full float32, and TF32's 10-bit mantissa moves FID in the second decimal.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def _one_cpu_thread(device):
    # The domain net's ops are far too small for intra-op parallelism to pay, and OpenMP's spinning threads
    # collapse when cores are shared (Ray workers, other jobs): docs/performance.md, "Figures behind the code"
    if torch.device(device).type != "cpu":
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------
# Inception-v3 as in the TF FID graph
# ---------------------------------------------------------------------------------------------

def _fid_inception(weights_path: str | Path) -> FeatureExtractorInceptionV3:
    """torch-fidelity's FID Inception (its name "inception-v3-compat"), loaded from a local weights file: it resizes
    uint8 NCHW images to 299 as TF1's ResizeBilinear does, scales them by (x - 128) / 128, and returns pool_3 and
    the softmax layer's MatMul without the bias. pytorch-fid's file has its parameter names and shapes."""
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(weights_path))


class InceptionExtractor:
    """pool_3 (2048), bias-free logits (1008) and mixed_6/conv sFID features, as ADM's evaluator reads them.

    Input handling follows the graph ADM feeds at ExpandDims: the uint8 values as floats, bilinear resize to
    299 x 299 (TF1 semantics), then (x - 128) / 128, i.e. [-1, 1). Greyscale images are repeated to RGB.
    """

    def __init__(self, net: FeatureExtractorInceptionV3, *, name: str, weights_checksum: str, batch_size: int = 64):
        self.net = net.eval().requires_grad_(False)
        self.name = name
        self.weights_checksum = weights_checksum
        self.batch_size = batch_size
        self._spatial = None
        # ADM's sFID layer "mixed_6/conv" is the post-ReLU 1x1 branch of the 7th mixed block, i.e. Mixed_6d
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        self._spatial = output

    @classmethod
    def from_file(cls, path: str | Path | None = None, **kwargs) -> InceptionExtractor:
        """The real FID Inception from pytorch-fid's weights file (path, else $SDDIT_INCEPTION_WEIGHTS)."""
        path = path or os.environ.get(WEIGHTS_ENV)
        how = (f"Download {FID_WEIGHTS_FILE} where there is network ({FID_WEIGHTS_URL}, e.g. with curl -LO), "
               f"copy it to this machine, and pass its path with --inception-weights PATH or set {WEIGHTS_ENV}=PATH")
        if not path:
            raise ExtractorError(f"no Inception weights given. {how}.")
        path = Path(path)
        if not path.is_file():
            raise ExtractorError(f"Inception weights file {str(path)!r} does not exist. {how}.")
        checksum = file_sha256(path)
        if not checksum.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise ExtractorError(
                f"Inception weights file {str(path)!r} has sha256 {checksum[:16]}..., but {FID_WEIGHTS_FILE} "
                f"starts with {FID_WEIGHTS_SHA256_PREFIX}: a different or damaged file. {how}.")
        try:
            # torch-fidelity unpickles the file with weights_only=False; load it once with weights_only=True
            # first, so a file that holds anything but tensors is refused before it can run code.
            torch.load(path, map_location="cpu", weights_only=True)
            net = _fid_inception(path)
        except (RuntimeError, ValueError, pickle.UnpicklingError) as error:
            raise ExtractorError(f"cannot load {str(path)!r} into the FID Inception-v3: {error}") from error
        return cls(net, name="inception", weights_checksum=checksum, **kwargs)

    @classmethod
    def random(cls, seed: int = 0, **kwargs) -> InceptionExtractor:
        """FOR TESTS ONLY: the real architecture with seeded random weights, named 'inception-random' so its
        numbers can never pass for Inception metrics. He-initialised so activations stay O(1) through the
        network (BatchNorm at its identity init), which keeps the features informative enough to test with.
        The weights go through a file, as the real ones do; torchvision's Inception3 with 1008 classes and no
        aux head has the FID graph's parameters (its differences are in the pooling, which has none)."""
        with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(seed)
            template = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
            for module in template.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                elif isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=1 / math.sqrt(module.in_features))
            path = Path(directory) / "inception-random.pth"
            torch.save(template.state_dict(), path)
            net = _fid_inception(path)
        return cls(net, name="inception-random", weights_checksum=state_dict_sha256(net), **kwargs)

    def to(self, device) -> InceptionExtractor:
        self.net.to(device)
        return self

    @property
    def device(self):
        return self.net.fc.weight.device

    @torch.no_grad()
    def _extract_batch(self, images) -> dict[str, np.ndarray]:
        x = torch.as_tensor(np.asarray(images))
        if x.ndim != 4 or x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images [N, H, W, C], got {tuple(x.shape)} {x.dtype}")
        x = x.permute(0, 3, 1, 2).contiguous().to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with _full_float32():
            pool, logits = self.net(x)          # ADM's IS uses the softmax layer's MatMul, before the bias
        spatial, self._spatial = sfid_features(self._spatial), None
        return {"pool": pool.cpu().numpy(), "logits": logits.cpu().numpy(), "spatial": spatial}

    def extract(self, images) -> dict:
        return _extract_in_batches(self._extract_batch, images, self.batch_size)


def _extract_in_batches(extract_batch, images, batch_size: int) -> dict:
    parts = [extract_batch(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        raise ValueError("no images to extract features from")
    return {key: None if parts[0][key] is None else np.concatenate([p[key] for p in parts])
            for key in parts[0]}


# ---------------------------------------------------------------------------------------------
# A classifier of the dataset's own classes
# ---------------------------------------------------------------------------------------------

class DomainNet(nn.Module):
    """Three conv stages and a 128-d penultimate layer: enough for digits-sized data, trained in seconds.

    Its sFID features play the role of Inception's mixed_6/conv: the first SFID_CHANNELS channels of the
    second stage's output (half the input side), flattened in (h, w, c) order as ADM does."""

    SFID_CHANNELS = 4

    def __init__(self, in_channels: int, num_classes: int, input_size: int, width: int = 16, features: int = 128):
        super().__init__()
        self.architecture = {"in_channels": in_channels, "num_classes": num_classes, "input_size": input_size,
                             "width": width, "features": features}
        self.input_size = input_size

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU()]

        self.low = nn.Sequential(*stage(in_channels, width), nn.MaxPool2d(2), *stage(width, 2 * width))
        self.high = nn.Sequential(nn.MaxPool2d(2), *stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4 * width, features), nn.ReLU())
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, images_uint8_nchw: torch.Tensor):
        x = images_uint8_nchw.float() / 127.5 - 1
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        low = self.low(x)                                  # [N, 2 width, side / 2, side / 2]
        features = self.high(low)
        spatial = low[:, :self.SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        return features, self.classifier(features), spatial


def content_order(images, labels, groups) -> np.ndarray:
    """The permutation that sorts rows by a hash of (pixels, label, group): the same rows in any order come out
    in one order, so a judge trained on them is the same network."""
    keys = [hashlib.sha256(np.ascontiguousarray(image).tobytes() + f"|{label}|{group}".encode()).digest()
            for image, label, group in zip(np.asarray(images), np.asarray(labels), np.asarray(groups))]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


class DomainExtractor:
    """Penultimate features, logits, the predicted class and sFID features of a `DomainNet`."""

    name = "domain"

    def __init__(self, net: DomainNet, *, accuracy: float, info: dict | None = None, batch_size: int = 256):
        self.net = net.eval().requires_grad_(False)
        self.accuracy = accuracy
        self.info = info or {}
        self.batch_size = batch_size
        self.weights_checksum = state_dict_sha256(net)

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, groups, *, num_classes: int, seed: int = 0,
            held_out: float = 0.2, device="cpu") -> DomainExtractor:
        """Train on uint8 NHWC images; `groups` (e.g. the source image id) keeps an image and its flipped copy
        on the same side of the held-out split, so the recorded accuracy is on unseen images."""
        # a function of the image set alone: rows in the order of their contents, whatever order the shards held
        images, labels, groups = (np.asarray(a)[content_order(images, labels, groups)] for a in (images, labels, groups))
        labels = labels.astype(np.int64)
        if num_classes < 2:
            raise ExtractorError(f"the domain classifier needs a labelled dataset with >= 2 classes, "
                                 f"got {num_classes}")
        rng = np.random.default_rng(seed)
        names, group_index = np.unique(np.asarray(groups), return_inverse=True)
        test_groups = rng.permutation(len(names))[:max(1, round(held_out * len(names)))]
        test = np.isin(group_index, test_groups)
        if test.all():
            raise ExtractorError(f"too few images ({len(names)}) to hold some out for the domain classifier")
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))
        y = torch.from_numpy(labels)
        train_idx = torch.from_numpy(np.flatnonzero(~test))
        batch = min(64, len(train_idx))
        # ~30 epochs, within [150, 1000] steps: enough for a judge that recognises the classes, short enough
        # to train on first use
        steps = int(np.clip(30 * math.ceil(len(train_idx) / batch), 150, 1000))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = DomainNet(x.shape[1], num_classes, input_size=min(32, x.shape[-1])).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3, foreach=True)
        generator = torch.Generator().manual_seed(seed)
        net.train()
        with _one_cpu_thread(device):
            for _ in range(steps):
                idx = train_idx[torch.randint(len(train_idx), (batch,), generator=generator)]
                logits = net(x[idx].to(device))[1]
                loss = F.cross_entropy(logits, y[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        extractor = cls(net, accuracy=0.0, info={"train_rows": int((~test).sum()), "held_out_rows": int(test.sum()),
                                                  "steps": steps, "seed": seed})
        predicted = extractor.extract(np.asarray(images)[test])["predicted"]
        extractor.accuracy = float((predicted == labels[test]).mean())
        return extractor

    @classmethod
    def for_dataset(cls, directory: str | Path, shard_checksums: list[str], load_rows, *, num_classes: int,
                    seed: int = 0, device="cpu") -> DomainExtractor:
        """The classifier cached at <directory>/domain_classifier.pt, trained (and cached) first if that file is
        missing or was trained on other shards. `load_rows()` -> (uint8 NHWC images, labels, groups)."""
        path = Path(directory) / DOMAIN_CACHE_FILE
        key = {"format": DOMAIN_CACHE_FORMAT, "shard_sha256": list(shard_checksums), "seed": seed,
               "num_classes": num_classes}
        if path.is_file():
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") == key:
                net = DomainNet(**payload["architecture"])
                net.load_state_dict(payload["state_dict"])
                return cls(net, accuracy=payload["accuracy"], info=payload["info"]).to(device)
            print(f"domain classifier: {path} was trained on other shards or settings; retraining", flush=True)
        images, labels, groups = load_rows()
        extractor = cls.fit(images, labels, groups, num_classes=num_classes, seed=seed, device=device)
        net = extractor.net
        payload = {"key": key, "accuracy": extractor.accuracy, "info": extractor.info,
                   "architecture": net.architecture,
                   "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}}
        write_atomically(path, lambda f: torch.save(payload, f))
        print(f"domain classifier: trained on {extractor.info['train_rows']} rows, held-out accuracy "
              f"{extractor.accuracy:.3f}; cached at {path}", flush=True)
        return extractor

    def to(self, device) -> DomainExtractor:
        self.net.to(device)
        return self

    @property
    def device(self):
        return self.net.classifier.weight.device

    @torch.no_grad()
    def _extract_batch(self, images) -> dict:
        x = torch.as_tensor(np.asarray(images))
        if x.ndim != 4 or x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images [N, H, W, C], got {tuple(x.shape)} {x.dtype}")
        expected = self.net.architecture["in_channels"]
        if x.shape[-1] != expected:
            raise ValueError(f"the domain classifier was trained on {expected}-channel images, got {x.shape[-1]}")
        with _one_cpu_thread(self.device):
            features, logits, spatial = self.net(x.permute(0, 3, 1, 2).to(self.device))
        return {"pool": features.cpu().numpy(), "logits": logits.cpu().numpy(),
                "spatial": spatial.double().cpu().numpy(),
                "predicted": logits.argmax(1).cpu().numpy()}

    def extract(self, images) -> dict:
        return _extract_in_batches(self._extract_batch, images, self.batch_size)
