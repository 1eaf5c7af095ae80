"""The shared solver in float64 on random matrices, against its defining optimality conditions."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from erasekit.solvers import DTYPE, Moments, SolveError, null_space_projector, null_space_solve, ridge_solve

import pytest


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def objective_grad(w, w0, c, g, p, lam, s_e, s_p):
    """Gradient of s_e||W C - W0 G|| + s_p||W P - W0 P|| + lam||W - W0|| (all rows as columns)."""
    return 2 * (s_e * (w @ c.T - w0 @ g.T) @ c + s_p * (w @ p.T - w0 @ p.T) @ p + lam * (w - w0))


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(2, 24), d_out=st.integers(1, 16), n_e=st.integers(1, 10), n_p=st.integers(0, 10),
       lam=st.floats(1e-3, 10), s_e=st.floats(0.1, 10), s_p=st.floats(0.0, 10), seed=st.integers(0, 1000))
def test_ridge_solution_has_zero_gradient(d_in, d_out, n_e, n_p, lam, s_e, s_p, seed):
    w0, c, g, p = rand(d_out, d_in, seed=seed), rand(n_e, d_in, seed=seed + 1), rand(n_e, d_in, seed=seed + 2), \
        rand(n_p, d_in, seed=seed + 3)
    m = Moments(d_in)
    m.add_erase(c, g)
    m.add_preserve(p)
    w = ridge_solve(w0, m, lam=lam, erase_scale=s_e, preserve_scale=s_p)
    grad = objective_grad(w, w0, c, g, p, lam, s_e, s_p)
    scale = 1 + objective_grad(w0, w0, c, g, p, lam, s_e, s_p).abs().max()
    assert grad.abs().max() / scale < 1e-9


def test_targets_reach_anchors_as_regularisation_vanishes():
    d, n = 16, 5
    w0, c, g = rand(8, d), rand(n, d, seed=1), rand(n, d, seed=2)
    m = Moments(d)
    m.add_erase(c, g)
    errs = []
    for lam in (1.0, 1e-2, 1e-4, 1e-6):
        w = ridge_solve(w0, m, lam=lam)
        errs.append(float((w @ c.T - w0 @ g.T).norm() / (w0 @ g.T).norm()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-5


def test_accumulation_is_linear_in_rows_and_order_free():
    d = 12
    c, g = rand(30, d, seed=1), rand(30, d, seed=2)
    a, b = Moments(d), Moments(d)
    a.add_erase(c, g)
    for i in (2, 0, 1):
        b.add_erase(c[i * 10:(i + 1) * 10], g[i * 10:(i + 1) * 10])
    assert torch.allclose(a.s_cc, b.s_cc, atol=1e-12) and torch.allclose(a.s_gc, b.s_gc, atol=1e-12)
    assert a.n_erase == b.n_erase == 30


@settings(max_examples=20, deadline=None)
@given(d=st.integers(6, 24), r=st.integers(1, 5), n_e=st.integers(1, 4), alpha=st.floats(0.01, 5),
       seed=st.integers(0, 1000))
def test_null_space_keeps_preserved_outputs(d, r, n_e, alpha, seed):
    w0 = rand(7, d, seed=seed)
    basis = rand(r, d, seed=seed + 1)
    keep = rand(9, r, seed=seed + 2) @ basis  # preserve rows span an r-dim subspace
    c, g = rand(n_e, d, seed=seed + 3), rand(n_e, d, seed=seed + 4)
    m = Moments(d)
    m.add_erase(c, g)
    proj = null_space_projector(keep.T @ keep, tau=1e-8, relative=True)
    w = null_space_solve(w0, m, proj, alpha=alpha)
    rel = ((w - w0) @ keep.T).norm() / (w0 @ keep.T).norm()
    assert rel < 1e-8


def test_equality_constraints_hold_exactly_and_erase_still_moves():
    d = 20
    w0, c, g = rand(10, d), rand(3, d, seed=1), rand(3, d, seed=2)
    k = rand(d, 4, seed=3)
    m = Moments(d)
    m.add_erase(c, g)
    proj = torch.eye(d, dtype=DTYPE)
    w = null_space_solve(w0, m, proj, alpha=0.5, constraints=k, mu=0.0)
    assert ((w - w0) @ k).abs().max() < 1e-9
    before = (w0 @ c.T - w0 @ g.T).norm()
    assert (w @ c.T - w0 @ g.T).norm() < before


def test_speed_unconstrained_matches_its_normal_equations():
    d = 10
    w0, c, g = rand(6, d), rand(4, d, seed=1), rand(4, d, seed=2)
    m = Moments(d)
    m.add_erase(c, g)
    proj = torch.eye(d, dtype=DTYPE)
    w = null_space_solve(w0, m, proj, alpha=0.3)
    # with P = I it is ridge towards W0 with lam = alpha
    assert torch.allclose(w, ridge_solve(w0, m, lam=0.3), atol=1e-10)


def test_singular_and_non_finite_systems_are_clear_errors():
    d = 6
    m = Moments(d)
    m.add_erase(rand(2, d), rand(2, d, seed=1))
    with pytest.raises(SolveError, match="lam"):
        ridge_solve(rand(3, d), m, lam=0.0)
    bad = rand(3, d)
    bad[0, 0] = float("nan")
    with pytest.raises(SolveError, match="non-finite"):
        ridge_solve(bad, m, lam=0.1)


def test_shared_factorisation_follows_the_moments():
    """Layers share one factorisation per (scales, projector); adding rows or changing them must not reuse it."""
    d = 12
    m = Moments(d)
    m.add_erase(rand(4, d, seed=1), rand(4, d, seed=2))
    w_a, w_b = rand(6, d, seed=3), rand(9, d, seed=4)
    first = ridge_solve(w_a, m, lam=0.5)
    assert torch.equal(ridge_solve(w_a, m, lam=0.5), first)
    fresh = Moments(d)
    fresh.add_erase(rand(4, d, seed=1), rand(4, d, seed=2))
    assert torch.allclose(ridge_solve(w_b, m, lam=0.5), ridge_solve(w_b, fresh, lam=0.5), atol=1e-12)
    assert not torch.allclose(ridge_solve(w_a, m, lam=2.0), first)  # another lam, another system
    m.add_preserve(rand(3, d, seed=5))
    fresh.add_preserve(rand(3, d, seed=5))
    assert torch.allclose(ridge_solve(w_a, m, lam=0.5), ridge_solve(w_a, fresh, lam=0.5), atol=1e-12)
    p1 = null_space_projector(fresh.s_pp, tau=1e-6)
    p2 = torch.eye(d, dtype=DTYPE)
    n1 = null_space_solve(w_a, m, p1, alpha=1.0)
    n2 = null_space_solve(w_a, m, p2, alpha=1.0)
    assert not torch.allclose(n1, n2)
    assert torch.allclose(null_space_solve(w_a, fresh, p2, alpha=1.0), n2, atol=1e-12)


def test_shared_transform_paths_agree_with_the_per_layer_formulas():
    """W0 T (one d x d T for all layers) and Gram-matrix residuals equal the direct per-layer algebra."""
    from erasekit.solvers import residuals

    d = 10
    m = Moments(d)
    m.add_erase(rand(3, d, seed=1), rand(3, d, seed=2))
    m.add_preserve(rand(5, d, seed=3))
    for d_out in (4, 17):
        w0 = rand(d_out, d, seed=d_out)
        fast = ridge_solve(w0, m, lam=0.3, erase_scale=2.0, preserve_scale=0.5)
        direct = ridge_solve(w0, m, lam=0.3, erase_scale=2.0, preserve_scale=0.5,
                             w_target=w0.clone(), w_preserve=w0.clone(), w_ref=w0.clone())
        assert torch.allclose(fast, direct, atol=1e-10)
        proj = null_space_projector(m.s_pp, tau=1e-3, relative=True)
        n_fast = null_space_solve(w0, m, proj, alpha=0.7)
        n_direct = null_space_solve(w0, m, proj, alpha=0.7, w_target=w0.clone())
        assert torch.allclose(n_fast, n_direct, atol=1e-10)
        r_fast = residuals(fast, w0, m)
        r_direct = residuals(fast, w0, m, w_target=w0.clone(), w_preserve=w0.clone())
        for k in r_fast:
            assert r_fast[k] == pytest.approx(r_direct[k], rel=1e-8, abs=1e-12)
