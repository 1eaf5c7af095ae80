"""The shared closed-form solver of the cross-attention K/V edit family.

Every cross-attention key/value projection ``W`` of a diffusion UNet reads the same text
embeddings, and every closed-form method asks ``W`` to send some input rows ``c`` to targets
that are themselves a weight matrix applied to another row (``v* = W_t g``). So the data enter
only through ``d x d`` second-moment sums that are shared by all layers:

    S_cc = sum c c^T      (erase rows)
    S_gc = sum g c^T      (target rows against erase rows)
    S_gg = sum g g^T      (for residuals)
    S_pp = sum p p^T      (preserve rows)

accumulated once in float64, at a cost linear in the number of rows (concepts), then solved per
layer with ``d x d`` algebra:

    min_W  s_e sum ||W c - W_t g||^2 + s_p sum ||W p - W_p p||^2 + lam ||W - W_ref||_F^2
    W = (lam W_ref + s_e W_t S_gc + s_p W_p S_pp) (lam I + s_e S_cc + s_p S_pp)^{-1}

and, for SPEED, the null-space variant with optional equality constraints ``dW K = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ErasekitError

DTYPE = torch.float64


class SolveError(ErasekitError):
    """The linear system is singular or not finite."""


@dataclass
class Moments:
    """Second-moment sums of (erase, target) and preserve rows, in float64."""

    dim: int
    s_cc: torch.Tensor = field(init=False)
    s_gc: torch.Tensor = field(init=False)
    s_gg: torch.Tensor = field(init=False)
    s_pp: torch.Tensor = field(init=False)
    n_erase: float = 0.0
    n_preserve: float = 0.0
    # factorisations of the d x d system, shared by every layer that solves with the same scales
    _factors: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        z = lambda: torch.zeros(self.dim, self.dim, dtype=DTYPE)  # noqa: E731
        self.s_cc, self.s_gc, self.s_gg, self.s_pp = z(), z(), z(), z()

    def add_erase(self, c: torch.Tensor, g: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Add erase rows ``c`` (n, d) with target rows ``g`` (n, d); optional per-row weights."""
        if c.shape != g.shape or c.shape[-1] != self.dim:
            raise ValueError(f"erase rows {tuple(c.shape)} and targets {tuple(g.shape)} must both be (n, {self.dim})")
        c, g = c.to(DTYPE), g.to(DTYPE)
        w = torch.as_tensor(weight, dtype=DTYPE)
        cw = c * w.reshape(-1, 1) if w.ndim else c * w
        self.s_cc += cw.T @ c
        self.s_gc += g.T @ cw
        self.s_gg += (g * (w.reshape(-1, 1) if w.ndim else w)).T @ g
        self.n_erase += float(w.sum()) if w.ndim else float(w) * len(c)
        self._factors.clear()

    def add_preserve(self, p: torch.Tensor, weight: float = 1.0) -> None:
        """Add preserve rows ``p`` (n, d)."""
        if p.numel() == 0:
            return
        if p.shape[-1] != self.dim:
            raise ValueError(f"preserve rows must be (n, {self.dim}), got {tuple(p.shape)}")
        p = p.to(DTYPE)
        self.s_pp += weight * (p.T @ p)
        self.n_preserve += weight * len(p)
        self._factors.clear()


def _check_finite(*ts: torch.Tensor) -> None:
    for t in ts:
        if not torch.isfinite(t).all():
            raise SolveError("the closed-form system has non-finite entries (NaN/inf embeddings or weights); "
                             "check the model's weights and dtype")


def _factor(b: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Cholesky factor of symmetric positive-definite ``b``; LU where that fails."""
    l, info = torch.linalg.cholesky_ex(b)
    if int(info) == 0:
        return "cholesky", l
    return "lu", b


def _solve_right(a: torch.Tensor, b: torch.Tensor, factor: tuple[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Return ``a @ inv(b)`` for symmetric ``b`` (Cholesky, LU fallback)."""
    kind, f = factor or _factor(b)
    if kind == "cholesky":
        return torch.cholesky_solve(a.T, f).T
    try:
        x = torch.linalg.solve(f.T, a.T).T
    except RuntimeError:
        raise SolveError("the closed-form system is singular; raise the regulariser (--set lam=...) "
                         "or add preserve prompts") from None
    _check_finite(x)
    return x


def ridge_solve(w0: torch.Tensor, m: Moments, *, lam: float, erase_scale: float = 1.0, preserve_scale: float = 1.0,
                w_target: torch.Tensor | None = None, w_preserve: torch.Tensor | None = None,
                w_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Regularised least-squares edit of one layer; returns the new weight in float64.

    Args:
        w0: current weight (d_out, d_in).
        m: accumulated moments.
        lam: weight of ``||W - W_ref||^2``; must be > 0 unless the data make the system invertible.
        erase_scale, preserve_scale: ``s_e`` and ``s_p``.
        w_target: maps target rows to outputs (default ``w0``).
        w_preserve: preserved outputs are ``w_preserve @ p`` (default ``w0``).
        w_ref: regulariser anchor (default ``w0``).
    """
    w0 = w0.to(DTYPE)
    if w_target is None and w_preserve is None and w_ref is None:
        # every term reads W0 through the same rows, so W = W0 T with one d x d T for all layers:
        # T = (lam I + s_e S_gc + s_p S_pp)(lam I + s_e S_cc + s_p S_pp)^-1, built once per fit
        key = ("ridge-transform", float(lam), float(erase_scale), float(preserve_scale))
        if key not in m._factors:
            eye = torch.eye(m.dim, dtype=DTYPE)
            m._factors[key] = ridge_solve(eye, m, lam=lam, erase_scale=erase_scale, preserve_scale=preserve_scale,
                                          w_target=eye, w_preserve=eye, w_ref=eye)
        _check_finite(w0)
        return w0 @ m._factors[key]
    wt = w0 if w_target is None else w_target.to(DTYPE)
    wp = w0 if w_preserve is None else w_preserve.to(DTYPE)
    wr = w0 if w_ref is None else w_ref.to(DTYPE)
    a = lam * wr + erase_scale * (wt @ m.s_gc) + preserve_scale * (wp @ m.s_pp)
    _check_finite(a)
    key = ("ridge", float(lam), float(erase_scale), float(preserve_scale))
    if key not in m._factors:  # the d x d system is the same for every layer: factor it once
        b = lam * torch.eye(m.dim, dtype=DTYPE) + erase_scale * m.s_cc + preserve_scale * m.s_pp
        _check_finite(b)
        if lam <= 0 and torch.linalg.matrix_rank(b) < m.dim:
            raise SolveError("with lam=0 the erase and preserve rows do not span the embedding space; "
                             "set lam > 0 (--set lam=0.1)")
        m._factors[key] = _factor(b)
    return _solve_right(a, None, m._factors[key])


def null_space_projector(s_pp: torch.Tensor, tau: float, relative: bool = False) -> torch.Tensor:
    """Projector onto the eigenvectors of the preserve moment with eigenvalue below ``tau``."""
    evals, evecs = torch.linalg.eigh(s_pp.to(DTYPE))
    thr = tau * evals.max().clamp(min=1e-300) if relative else tau
    u = evecs[:, evals < thr]
    return u @ u.T


def null_space_solve(w0: torch.Tensor, m: Moments, projector: torch.Tensor, *, alpha: float,
                     constraints: torch.Tensor | None = None, mu: float = 0.0,
                     w_target: torch.Tensor | None = None) -> torch.Tensor:
    """SPEED's edit: ``dW = (W_t S_gc - W0 S_cc) P [I - M K (K^T P M K + mu I)^-1 K^T P] M``.

    ``M = (S_cc P + alpha I)^-1``. Returns the new weight ``W0 + dW`` in float64. With
    ``mu = 0`` the update satisfies ``dW K = 0``; rows ``p`` with ``P p = 0`` keep their output.
    """
    w0 = w0.to(DTYPE)
    wt = w0 if w_target is None else w_target.to(DTYPE)
    _check_finite(w0, wt)
    key = ("null", float(alpha), float(mu))
    hit = m._factors.get(key)
    # the right-hand factor P [I - ...] M is the same for every layer: build it once per fit
    if hit is None or hit[0] is not projector or hit[1] is not constraints:
        p = projector.to(DTYPE)
        _check_finite(p)
        eye = torch.eye(m.dim, dtype=DTYPE)
        mm = torch.linalg.solve(m.s_cc @ p + alpha * eye, eye)  # M, general (non-symmetric) solve
        core = eye
        if constraints is not None and constraints.numel():
            k = constraints.to(DTYPE)
            inner = k.T @ p @ mm @ k + mu * torch.eye(k.shape[1], dtype=DTYPE)
            try:
                core = eye - mm @ k @ torch.linalg.solve(inner, k.T @ p)
            except RuntimeError:
                raise SolveError("the equality constraints are degenerate; set mu > 0 (--set mu=0.1)") from None
        hit = m._factors[key] = (projector, constraints, p @ core @ mm)
    if w_target is None:  # dW = W0 (S_gc - S_cc) R: one d x d transform shared by all layers
        tkey = ("null-transform", float(alpha), float(mu))
        th = m._factors.get(tkey)
        if th is None or th[0] is not hit[2]:
            th = m._factors[tkey] = (hit[2], torch.eye(m.dim, dtype=DTYPE) + (m.s_gc - m.s_cc) @ hit[2])
        w = w0 @ th[1]
        _check_finite(w)
        return w
    dw = (wt @ m.s_gc - w0 @ m.s_cc) @ hit[2]
    _check_finite(dw)
    return w0 + dw


def residuals(w: torch.Tensor, w0: torch.Tensor, m: Moments, w_target: torch.Tensor | None = None,
              w_preserve: torch.Tensor | None = None) -> dict[str, float]:
    """Relative erase residual ``sum||Wc - W_t g||^2 / sum||W_t g||^2`` and preserve drift."""
    w, w0 = w.to(DTYPE), w0.to(DTYPE)
    if w_target is None and w_preserve is None:
        # every term is trace(A S B^T) with A, B in {W, W0}: = <B^T A, S^T>, so three d x d Gram
        # products per layer replace seven (d_out x d x d) ones
        g00, gww, gw0 = w0.T @ w0, w.T @ w, w0.T @ w  # gw0 = W0^T W

        def tr(gram: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:  # trace(A S B^T) with gram = B^T A
            return (gram * s_.T).sum()

        tgt = tr(g00, m.s_gg)
        err = tr(gww, m.s_cc) - 2 * tr(gw0, m.s_gc.T) + tgt
        before = tr(g00, m.s_cc) - 2 * tr(g00, m.s_gc.T) + tgt
        drift = tr(gww - gw0 - gw0.T + g00, m.s_pp)
        base = tr(g00, m.s_pp)
    else:
        wt = w0 if w_target is None else w_target.to(DTYPE)
        wp = w0 if w_preserve is None else w_preserve.to(DTYPE)

        def tr3(a_: torch.Tensor, s_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:  # trace(A S B^T)
            return ((a_ @ s_) * b_).sum()

        tgt = tr3(wt, m.s_gg, wt)
        err = tr3(w, m.s_cc, w) - 2 * tr3(w, m.s_gc.T, wt) + tgt
        before = tr3(w0, m.s_cc, w0) - 2 * tr3(w0, m.s_gc.T, wt) + tgt
        d = w - wp
        drift = tr3(d, m.s_pp, d)
        base = tr3(wp, m.s_pp, wp)
    return {
        "erase_residual": float(err.clamp(min=0) / tgt.clamp(min=1e-30)),
        "erase_residual_before": float(before.clamp(min=0) / tgt.clamp(min=1e-30)),
        "preserve_drift": float(drift.clamp(min=0) / base.clamp(min=1e-30)) if m.n_preserve else 0.0,
    }
