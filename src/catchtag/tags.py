"""Tags: what a sink head writes into the tokens it catches.

The tag of sink s in head (l, h) is t_s = W_O^h v_s (PAPER.md): the sink's value vector passed
through the head's slice of the output projection. A token caught by s attends mostly to s, so its
head output o_i = W_O^h sum_j A_ij v_j is close to A_is t_s: caught tokens share the direction t_s.
The tag subspace of a head is the span of its sinks' tags.
"""

from __future__ import annotations

import torch

from .capture import Capture, per_head_project
from .models import Model


def tag_vectors(model: Model, cap: Capture, layer: int, positions=None) -> torch.Tensor:
    """(H, P, d_model): t = W_O^h v_p for every head h and each position p (default: all)."""
    v = cap.attn_inputs[layer].v  # (H, T, dh)
    if positions is not None:
        v = v[:, list(positions)]
    return per_head_project(model, layer, v)


def orthonormal_basis(vectors: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """(d, r) orthonormal basis of the span of the rows of `vectors` (n, d); r <= n."""
    vectors = torch.as_tensor(vectors, dtype=torch.float64)
    if vectors.numel() == 0:
        return torch.zeros(vectors.shape[-1], 0, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(vectors.T, full_matrices=False)
    keep = s > rtol * s.max().clamp_min(1e-30)
    return u[:, keep]


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Component of x (..., d) in the span of the orthonormal basis (d, r)."""
    b = basis.to(x.dtype)
    return (x @ b) @ b.T


def remove(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x with its component in the span of the basis projected out."""
    return x - project(x, basis)


def explained_variance(outputs: torch.Tensor, basis: torch.Tensor) -> float:
    """EV = ||P H||_F^2 / ||H||_F^2 with H the rows of `outputs` (n, d) centred, P the projector
    on the basis. NaN when there are fewer than two rows or H is zero."""
    H = torch.as_tensor(outputs, dtype=torch.float64)
    if H.shape[0] < 2:
        return float("nan")
    H = H - H.mean(dim=0, keepdim=True)
    total = float((H**2).sum())
    if total == 0.0:
        return float("nan")
    return float((project(H, basis.to(H.dtype)) ** 2).sum()) / total
