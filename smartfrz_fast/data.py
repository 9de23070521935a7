"""A small real dataset for the demo: scikit-learn's handwritten digits, enlarged offline.

``sklearn.datasets.load_digits()`` ships 1797 8x8 grey-level digits (0..16) inside the
scikit-learn package, so nothing is downloaded. The originals are split into train and test
*first* (stratified by class), then each side is enlarged with deterministic random distortions
(rotation, scale, shear, translation, a smooth elastic displacement and stroke thickening or
thinning) and resampled to ``image_size`` x ``image_size`` in one vectorised ``grid_sample`` per
batch. No distorted test image comes from an original digit that the training set has seen.

The same arguments always give identical tensors: every random draw comes from one seeded
``torch.Generator`` and the resampling is a pure function of those draws.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["load_digits_dataset", "load_digits_originals", "distort"]

NUM_CLASSES = 10
_MISSING_SKLEARN = (
    "The demo dataset comes from scikit-learn's bundled handwritten digits, but scikit-learn is "
    "not installed. Install it with `pip install scikit-learn`."
)
_ORIGINALS: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # cached after the first read


def _bundled_digits_file() -> Optional[str]:
    """Path of scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn
    (whose import pulls in SciPy and takes seconds); None where it is not there."""
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            return path
    return None


def load_digits_originals() -> Tuple[torch.Tensor, torch.Tensor]:
    """The 1797 original digits as ``float32 [N, 1, 8, 8]`` in [0, 1] and ``int64 [N]`` labels.

    The same data as ``sklearn.datasets.load_digits()``; read straight from the file that
    scikit-learn ships when it is found (fast), through ``load_digits()`` otherwise.
    """
    global _ORIGINALS
    if _ORIGINALS is None:
        import numpy as np

        flat = target = None
        path = _bundled_digits_file()
        if path is not None:
            try:
                table = np.loadtxt(path, delimiter=",", dtype=np.float64)
                if table.shape == (1797, 65):
                    flat, target = table[:, :-1], table[:, -1].astype(np.int64)
            except (OSError, ValueError):  # pragma: no cover - another layout: ask scikit-learn
                pass
        if flat is None:
            try:
                from sklearn.datasets import load_digits
            except ImportError as exc:
                raise ImportError(_MISSING_SKLEARN) from exc
            bunch = load_digits()
            flat, target = bunch.data, np.asarray(bunch.target, dtype=np.int64)
        images = torch.as_tensor(flat, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        _ORIGINALS = (images, torch.as_tensor(target, dtype=torch.int64))
    images, labels = _ORIGINALS
    return images.clone(), labels.clone()


def _stratified_split(
    labels: torch.Tensor, test_fraction: float, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices of the train and test originals: ``test_fraction`` of every class goes to test."""
    train_idx, test_idx = [], []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_test = int(round(idx.numel() * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train = torch.sort(torch.cat(train_idx)).values
    test = torch.sort(torch.cat(test_idx)).values
    return train, test


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def distort(
    images: torch.Tensor,
    image_size: int,
    generator: torch.Generator,
    strength: float = 1.0,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Randomly distort and resample ``images`` (``[N, 1, h, w]`` in [0, 1]) to ``image_size``.

    ``strength`` scales every distortion; 0 gives a plain bilinear enlargement. The output is
    ``float32 [N, 1, image_size, image_size]`` clamped to [0, 1].
    """
    n = images.shape[0]
    s = float(strength)
    # All random parameters are drawn up front, in a fixed order, so that the result does not
    # depend on batch_size.
    angle = _uniform(n, -15.0, 15.0, generator) * (s * math.pi / 180.0)
    scale = 1.0 + _uniform(n, -0.12, 0.12, generator) * s  # zoom factor of the digit
    aspect = 1.0 + _uniform(n, -0.08, 0.08, generator) * s
    shear = _uniform(n, -0.2, 0.2, generator) * s
    shift = _uniform(2 * n, -0.12, 0.12, generator).view(n, 2) * s  # in [-1, 1] coordinates
    coarse = 4
    elastic = torch.randn(n, 2, coarse, coarse, generator=generator) * (0.03 * s)
    # Stroke thickness: >0 thickens (dilation), <0 thins (erosion), blended by magnitude.
    thickness = _uniform(n, -0.6, 0.8, generator) * s

    out = torch.empty(n, 1, image_size, image_size, dtype=torch.float32)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        b = sl.stop - sl.start
        cos, sin = torch.cos(angle[sl]), torch.sin(angle[sl])
        sx = 1.0 / (scale[sl] * aspect[sl])  # the grid maps output to input: invert the zoom
        sy = aspect[sl] / scale[sl]
        theta = torch.zeros(b, 2, 3)
        # rotation @ shear @ scale (output coords -> input coords)
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = (cos * shear[sl] - sin) * sy
        theta[:, 1, 0] = sin * sx
        theta[:, 1, 1] = (sin * shear[sl] + cos) * sy
        theta[:, :, 2] = shift[sl]
        grid = F.affine_grid(theta, [b, 1, image_size, image_size], align_corners=False)
        disp = F.interpolate(
            elastic[sl], size=(image_size, image_size), mode="bicubic", align_corners=False
        )
        grid = grid + disp.permute(0, 2, 3, 1)
        x = F.grid_sample(
            images[sl], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        t = thickness[sl].view(b, 1, 1, 1)
        dilated = F.max_pool2d(x, 3, stride=1, padding=1)
        eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
        x = torch.where(t > 0, x + t * (dilated - x), x + (-t) * (eroded - x))
        out[sl] = x.clamp_(0.0, 1.0)
    return out


def _enlarge(
    images: torch.Tensor,
    labels: torch.Tensor,
    count: int,
    image_size: int,
    generator: torch.Generator,
    strength: float,
    include_clean: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` images made from ``images``, cycling through the originals in a shuffled order
    so that every original is used about equally often (and every class stays balanced)."""
    n = images.shape[0]
    reps = -(-count // n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:count]
    x = distort(images[order], image_size, generator, strength=strength)
    if include_clean:
        # The first pass over the originals is kept undistorted (only enlarged).
        first = min(n, count)
        clean_order = order[:first]
        x[:first] = distort(images[clean_order], image_size, generator, strength=0.0)
    return x, labels[order]


def load_digits_dataset(
    num_samples: int = 20000,
    seed: int = 0,
    image_size: int = 16,
    test_fraction: float = 0.25,
    num_test_samples: int | None = None,
    strength: float = 1.0,
    return_tensors: bool = False,
):
    """Train and test sets built from scikit-learn's 1797 handwritten digits.

    Args:
        num_samples: number of training images (distorted copies of the train originals).
        seed: seeds the train/test split and every distortion; same seed, same tensors.
        image_size: side of the square output images (the originals are 8x8).
        test_fraction: share of the originals (per class) held out for the test set.
        num_test_samples: number of test images; default ``max(#test originals, num_samples//4)``.
            The first copy of each test original is undistorted, the rest are distorted.
        strength: scales all distortions (0 = plain enlargement).
        return_tensors: return ``(x_train, y_train, x_test, y_test)`` instead of two
            ``TensorDataset``s.

    Images are ``float32 [N, 1, image_size, image_size]`` in [0, 1]; labels ``int64`` in 0..9.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 (the originals are 8x8), got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    images, labels = load_digits_originals()
    g = torch.Generator().manual_seed(int(seed))
    train_idx, test_idx = _stratified_split(labels, test_fraction, g)
    if num_test_samples is None:
        num_test_samples = max(test_idx.numel(), num_samples // 4)
    x_train, y_train = _enlarge(
        images[train_idx], labels[train_idx], num_samples, image_size, g, strength, False
    )
    x_test, y_test = _enlarge(
        images[test_idx], labels[test_idx], num_test_samples, image_size, g, strength, True
    )
    if return_tensors:
        return x_train, y_train, x_test, y_test
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def split_indices(seed: int = 0, test_fraction: float = 0.25) -> Tuple[torch.Tensor, torch.Tensor]:
    """The indices (into ``load_digits()``) of the train and test originals for ``seed``."""
    _, labels = load_digits_originals()
    g = torch.Generator().manual_seed(int(seed))
    return _stratified_split(labels, test_fraction, g)
