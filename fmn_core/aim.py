"""Aim: confine an update to the concept's own directions in the text-context space.

A cross-attention projection W (out x dim) sees the prompt only through context vectors
x. An update dW = up @ down changes a token's key or value by up @ (down @ x), so if the
rows of `down` are nearly orthogonal to every context an ordinary prompt produces, those
prompts are left as they were, while the concept's tokens can be moved freely. Closed-
form editors (UCE, MACE) exploit the same fact.

The directions are the top generalised eigenvectors of (concept covariance, preserve
covariance): they maximise concept energy per unit of energy on the preserve set.
"""
from __future__ import annotations

import torch


class SecondMoment:
    """Running E[x x^T] of context rows, so sets can be merged and cached cheaply."""

    def __init__(self, dim: int):
        self.total = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def add(self, rows: torch.Tensor) -> "SecondMoment":
        r = rows.double()
        self.total += r.T @ r
        self.count += r.shape[0]
        return self

    def merged(self, other: "SecondMoment") -> "SecondMoment":
        out = SecondMoment(self.total.shape[0])
        out.total, out.count = self.total + other.total, self.count + other.count
        return out

    def matrix(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def without(self, rows: torch.Tensor) -> "SecondMoment":
        """This moment with `rows` (added before) taken out again."""
        r = rows.double()
        out = SecondMoment(self.total.shape[0])
        out.total, out.count = self.total - r.T @ r, self.count - r.shape[0]
        return out


def blended(first: SecondMoment, second: SecondMoment, weight: float) -> SecondMoment:
    """A moment whose matrix is `first`'s plus `weight` times `second`'s: each set weighs as
    a whole, however many rows it holds (a few prompts beside thousands would not count)."""
    out = SecondMoment(first.total.shape[0])
    out.total, out.count = first.matrix() + weight * second.matrix(), 1
    return out


def ridged(matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """`matrix` plus `ridge` times its mean diagonal on the diagonal: a regulariser that
    keeps a second moment invertible when its rows do not span every direction."""
    dim = len(matrix)
    return matrix + ridge * matrix.trace() / dim * torch.eye(dim, dtype=matrix.dtype)


def concept_directions(concept: torch.Tensor, preserve: SecondMoment, count: int, ridge: float = 1e-3) -> torch.Tensor:
    """Orthonormal (dim, count) basis that the concept uses and ordinary prompts avoid.

    concept: (Nc, dim) context vectors at the concept's token positions.
    preserve: second moment of the context vectors of prompts that must stay as they are.
    ridge: relative regulariser of the preserve covariance (keeps the whitening stable
    when the preserve set does not span every direction).
    """
    dim = preserve.total.shape[0]
    if concept.ndim != 2 or concept.shape[1] != dim:
        raise ValueError(f"context shapes disagree: concept {tuple(concept.shape)}, preserve dimension {dim}")
    if not 1 <= count <= dim:
        raise ValueError(f"direction count must be in 1..{dim}, got {count}")
    c = concept.double()
    cov_p = ridged(preserve.matrix(), ridge)
    cov_c = c.T @ c / c.shape[0]
    chol = torch.linalg.cholesky(cov_p)
    whitened = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, cov_c, upper=False).T, upper=False)
    _, vectors = torch.linalg.eigh((whitened + whitened.T) / 2)  # ascending eigenvalues
    top = vectors[:, -count:].flip(-1)
    directions = torch.linalg.solve_triangular(chol.T, top, upper=True)
    basis, _ = torch.linalg.qr(directions)
    return basis.float()


def combine_bases(bases: list[torch.Tensor]) -> torch.Tensor:
    """One orthonormal basis spanning several concepts' directions."""
    basis, _ = torch.linalg.qr(torch.cat(bases, dim=1).double())
    return basis.float()
