"""Newton–Schulz orthogonalisation, batched over leading dimensions.

``orthogonalize(G)`` approximates ``U Vᵀ`` of ``G = U S Vᵀ`` for every matrix of
a ``[..., A, B]`` stack at once, with the quintic iteration Muon uses
(coefficients 3.4445, -4.7750, 2.0315; 5 steps by default). A stack of
experts ``[E, A, B]`` is therefore E independent orthogonalisations, never
one of the stack seen as a single matrix.

``method="gram"`` iterates on the small ``r x r`` Gram matrix of a wide
matrix (r = rows < columns): with ``X_k = Q_k X_0`` and ``A_k = X_k X_kᵀ``,
each step is ``P = aI + bA + cA²``, ``Q <- P Q``, ``A <- P A P``, all ``r x r``,
and ``X_0`` is touched once at the end. Square and tall matrices use the
standard iteration (which itself works on the transpose of a tall matrix).
"""

from __future__ import annotations

from typing import Literal

import torch

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NSMethod = Literal["standard", "gram"]


def _standard(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def _gram(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = COEFFICIENTS
    gram = x @ x.mT
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    q = eye.expand_as(gram)
    for _ in range(steps):
        p = a * eye + b * gram + c * gram @ gram
        q = p @ q
        gram = p @ gram @ p
    return q @ x


def orthogonalize(
    g: torch.Tensor, steps: int = 5, method: NSMethod = "standard", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Approximately orthogonalise each trailing ``[A, B]`` matrix of ``g`` (returns ``g``'s dtype)."""
    if g.ndim < 2:
        raise ValueError(f"Newton-Schulz needs matrices, got a tensor of shape {tuple(g.shape)}")
    x = g.to(dtype)
    wide = x.shape[-2] < x.shape[-1]  # decided on the matrix as given: tall ones take the standard path
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    x = _gram(x, steps) if method == "gram" and wide else _standard(x, steps)
    if transposed:
        x = x.mT
    return x.to(g.dtype)
