"""Linear CKA (Kornblith et al. 2019) through centred Gram matrices.

    CKA(X, Y) = <Kc, Lc>_F / (||Kc||_F ||Lc||_F),   K = X X^T, Kc = H K H, H = I - 11^T/n

The Gram form needs only ``[n, n]`` per representation whatever its width, so a run can keep
one per unit per snapshot (n = 128 probe samples) and compare every snapshot with the last.
"""

from __future__ import annotations

import torch
from torch import Tensor


def centered_gram(x: Tensor) -> Tensor:
    """``[n, d]`` features -> double-centred Gram matrix ``[n, n]`` (float32)."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)  # centring the features centres the Gram on both sides
    return (x @ x.T).float()


def cka_from_grams(k: Tensor, l: Tensor) -> Tensor:
    """Linear CKA of centred Grams ``k [..., n, n]`` and ``l`` (broadcast) -> ``[...]``.

    A representation that is constant on the probe batch (a zero Gram) gets CKA 0.
    """
    k, l = torch.broadcast_tensors(k.double(), l.double())
    num = (k * l).sum((-1, -2))
    den = torch.sqrt((k * k).sum((-1, -2)) * (l * l).sum((-1, -2)))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA of two representations ``[n, d1]`` and ``[n, d2]`` of the same n samples."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA compares representations of the same samples; got {x.shape[0]} and {y.shape[0]} rows")
    return cka_from_grams(centered_gram(x.flatten(1)), centered_gram(y.flatten(1)))
