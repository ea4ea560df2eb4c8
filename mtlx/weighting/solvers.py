"""Jit-able solvers for the small [T x T] problems inside MGDA, CAGrad and Nash-MTL.

All take the Gram matrix of the task gradients (or a scaled version of it) and a `present` mask:
absent tasks are decoupled from the problem and get weight 0. Loops are `lax.while_loop`s with a
fixed iteration cap and a convergence test, so they compile once and never branch in Python on
data. Gradients are not meant to flow through them (the strategies stop them, like LibMTL's
detached weights).
"""

from __future__ import annotations

from typing import Any, Tuple

import jax
import jax.numpy as jnp

from mtlx.weighting.base import mask_gram, masked, num_present, safe_div

Array = Any
_HI = jax.lax.Precision.HIGHEST


def _quad(a: Array, m: Array, b: Array) -> Array:
    return jnp.dot(a, jnp.dot(m, b, precision=_HI), precision=_HI)


# ---------------------------------------------------------------------------------------------
# Euclidean projection onto the probability simplex.

def project_to_simplex(y: Array, present: Array) -> Array:
    """argmin_{x in simplex over present entries} ||x - y||, 0 on absent entries.

    The sort-based algorithm of Chen & Ye (2011, "Projection onto a simplex"), which is what
    LibMTL's MGDA (`_projection2simplex`, from the official MGDA code) implements.
    """
    t = y.shape[0]
    m = num_present(present)
    desc = -jnp.sort(-jnp.where(present, y, -jnp.inf))          # absent entries sort last
    desc = jnp.where(jnp.isfinite(desc), desc, 0.0)
    idx = jnp.arange(t, dtype=y.dtype)
    tmax = (jnp.cumsum(desc) - 1.0) / (idx + 1.0)
    following = jnp.concatenate([desc[1:], desc[:1]])               # desc[i + 1]
    hit = (idx < m - 1) & (tmax > following)
    fallback = (jnp.sum(masked(y, present)) - 1.0) / jnp.maximum(m, 1.0)
    theta = jnp.where(jnp.any(hit), tmax[jnp.argmax(hit)], fallback)
    return jnp.where(present, jnp.maximum(y - theta, 0.0), 0.0)


# ---------------------------------------------------------------------------------------------
# MGDA: min-norm element of the convex hull of the task gradients.

def _min_norm_from2(v1v1: Array, v1v2: Array, v2v2: Array) -> Tuple[Array, Array]:
    """min_gamma ||gamma v1 + (1 - gamma) v2||^2 on [0, 1], with the official clamps."""
    denom = v1v1 + v2v2 - 2.0 * v1v2
    gamma = -safe_div(v1v2 - v2v2, denom, denom > 0)
    cost = v2v2 + gamma * (v1v2 - v2v2)
    first = v1v2 >= v1v1
    second = jnp.logical_not(first) & (v1v2 >= v2v2)
    gamma = jnp.where(first, 0.999, jnp.where(second, 0.001, gamma))
    cost = jnp.where(first, v1v1, jnp.where(second, v2v2, cost))
    return gamma, cost


def _next_point(cur: Array, grad: Array, present: Array, n: Array) -> Array:
    proj = jnp.where(present, grad - jnp.sum(masked(grad, present)) / jnp.maximum(n, 1.0), 0.0)
    neg = present & (proj < 0)
    pos = present & (proj > 0)
    tm1 = safe_div(-cur, proj, neg)
    tm2 = safe_div(1.0 - cur, proj, pos)
    ok1 = neg & (tm1 > 1e-7)
    ok2 = pos & (tm2 > 1e-7)
    step = jnp.where(jnp.any(ok1), jnp.min(jnp.where(ok1, tm1, jnp.inf)), 1.0)
    step = jnp.where(jnp.any(ok2), jnp.minimum(step, jnp.min(jnp.where(ok2, tm2, jnp.inf))), step)
    return project_to_simplex(proj * step + cur, present)


def min_norm_weights(gram: Array, present: Array, max_iter: int = 250,
                     stop_crit: float = 1e-5) -> Array:
    """Simplex weights w minimising ||sum_i w_i g_i|| (MGDA, Sener & Koltun 2018).

    Transcribes `MinNormSolver.find_min_norm_element` of the official MGDA code as used by
    LibMTL: start from the best pair (exact for two tasks), then projected-gradient steps each
    followed by an exact line search between the current and the new point, until the L1 change
    falls below `stop_crit` (returning the point before that last step, as the original does) or
    `max_iter` steps. One present task gets weight 1; none gives all zeros.
    """
    t = gram.shape[0]
    gram = mask_gram(gram.astype(jnp.float32), present)
    n = num_present(present)
    diag = jnp.diagonal(gram)

    gamma, cost = _min_norm_from2(diag[:, None], gram, diag[None, :])
    rows, cols = jnp.meshgrid(jnp.arange(t), jnp.arange(t), indexing="ij")
    pair_ok = present[:, None] & present[None, :] & (rows < cols)
    k = jnp.argmin(jnp.where(pair_ok, cost, jnp.inf).ravel())
    i, j = k // t, k % t
    g = gamma[i, j]
    pair = jnp.zeros((t,), jnp.float32).at[j].set(1.0 - g).at[i].set(g)
    init = jnp.where(n >= 2, pair, jnp.where(n == 1, present.astype(jnp.float32), 0.0))

    def cond(carry):
        it, _, done = carry
        return (it < max_iter) & jnp.logical_not(done) & (n >= 3)

    def body(carry):
        it, sol, _ = carry
        new_point = _next_point(sol, -jnp.dot(gram, sol, precision=_HI), present, n)
        nc, _ = _min_norm_from2(_quad(sol, gram, sol), _quad(sol, gram, new_point),
                                _quad(new_point, gram, new_point))
        new_sol = nc * sol + (1.0 - nc) * new_point
        converged = jnp.sum(jnp.abs(new_sol - sol)) < stop_crit
        return it + 1, jnp.where(converged, sol, new_sol), converged

    _, sol, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), init, jnp.bool_(False)))
    return sol


# ---------------------------------------------------------------------------------------------
# CAGrad's inner problem.

def cagrad_objective(w: Array, gram: Array, present: Array, c: Array) -> Array:
    """w^T G g0 + c sqrt(w^T G G^T w + 1e-8), g0 the mean of the present gradients (LibMTL)."""
    n = num_present(present)
    b = present.astype(jnp.float32) / jnp.maximum(n, 1.0)
    return _quad(w, gram, b) + c * jnp.sqrt(_quad(w, gram, w) + 1e-8)


def minimize_on_simplex(f, present: Array, lip0: Array, max_iter: int = 500,
                        tol: float = 1e-9) -> Array:
    """argmin of a smooth convex `f` over the simplex of the present tasks.

    Accelerated projected gradient (FISTA, Beck & Teboulle 2009) from the uniform point, with
    backtracking on the Lipschitz estimate (starting at `lip0`, allowed to shrink back each
    iteration) and a monotone restart; stops when the projected-gradient step moves less than
    `tol` (L1) or after `max_iter` iterations.
    """
    n = num_present(present)
    x0 = present.astype(jnp.float32) / jnp.maximum(n, 1.0)
    grad_f = jax.grad(f)

    def cond(carry):
        it, _, _, _, _, done = carry
        return (it < max_iter) & jnp.logical_not(done) & (n >= 2)

    def body(carry):
        it, x, y, mom, lip, _ = carry
        fy, gy = f(y), grad_f(y)

        def not_enough(bt):
            j, l_, p = bt
            d = p - y
            return (j < 60) & (f(p) > fy + jnp.dot(gy, d) + 0.5 * l_ * jnp.dot(d, d) + 1e-12)

        def grow(bt):
            j, l_, _ = bt
            return j + 1, 2.0 * l_, project_to_simplex(y - gy / (2.0 * l_), present)

        lip = lip / 1.5
        _, lip, p = jax.lax.while_loop(
            not_enough, grow, (0, lip, project_to_simplex(y - gy / lip, present)))
        worse = f(p) > f(x)
        mom_next = (1.0 + jnp.sqrt(1.0 + 4.0 * mom * mom)) / 2.0
        x_next = jnp.where(worse, x, p)
        y_next = jnp.where(worse, x, p + ((mom - 1.0) / mom_next) * (p - x))
        mom_next = jnp.where(worse, 1.0, mom_next)
        done = jnp.sum(jnp.abs(p - y)) < tol
        return it + 1, x_next, y_next, mom_next, lip, done

    carry = (jnp.int32(0), x0, x0, jnp.float32(1.0), jnp.maximum(lip0, 1e-12).astype(jnp.float32),
             jnp.bool_(False))
    _, x, _, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return x


def min_norm_weights_fista(gram: Array, present: Array, max_iter: int = 500) -> Array:
    """The same min-norm problem as `min_norm_weights`, solved to convergence by FISTA."""
    gram = mask_gram(gram.astype(jnp.float32), present)
    x = minimize_on_simplex(lambda w: _quad(w, gram, w), present, 2.0 * jnp.trace(gram),
                            max_iter)
    return jnp.where(num_present(present) == 1, present.astype(jnp.float32), x)


def cagrad_weights(gram: Array, present: Array, c: Array, max_iter: int = 500) -> Array:
    """min over the simplex (present tasks) of `cagrad_objective` (Liu et al. 2021).

    LibMTL solves this with SciPy's SLSQP; here `minimize_on_simplex` (FISTA). The objective is
    convex (linear + norm of a linear map) and smooth thanks to LibMTL's + 1e-8.
    """
    gram = mask_gram(gram.astype(jnp.float32), present)
    n = num_present(present)
    x0 = present.astype(jnp.float32) / jnp.maximum(n, 1.0)
    lip0 = c * jnp.trace(gram) / jnp.sqrt(_quad(x0, gram, x0) + 1e-8) + jnp.trace(gram)
    x = minimize_on_simplex(lambda w: cagrad_objective(w, gram, present, c), present, lip0,
                            max_iter)
    return jnp.where(num_present(present) == 1, present.astype(jnp.float32), x)


# ---------------------------------------------------------------------------------------------
# Nash-MTL's bargaining solution.

def nash_bargaining_weights(gram: Array, present: Array, init: Array, max_iter: int = 100,
                            ridge: float = 0.0, tol: float = 1e-12) -> Array:
    """alpha > 0 with (M alpha)_i = 1 / alpha_i for present i, M = `gram` (+ ridge I).

    That system is the stationarity condition of the strictly convex, self-concordant
    F(alpha) = 1/2 alpha^T M alpha - sum_i log alpha_i, so it is solved by Newton's method with
    a backtracking (Armijo) line search that keeps alpha > 0 (Boyd & Vandenberghe 2004, 9.5;
    quadratic convergence near the solution). Starts from `init` (warm start, as LibMTL reuses
    the previous alpha); stops when half the squared Newton decrement is below `tol` or after
    `max_iter` steps. A solution exists when M is positive definite; `ridge` > 0 keeps the
    problem bounded when the gradients are linearly dependent (LibMTL's CVXPY solve then fails
    and it keeps the previous alpha). Absent tasks are decoupled (identity rows) and get 0.
    """
    t = gram.shape[0]
    eye = jnp.eye(t, dtype=jnp.float32)
    both = present[:, None] & present[None, :]
    m = jnp.where(both, gram.astype(jnp.float32), eye) + ridge * eye
    alpha0 = jnp.where(present & (init > 0) & jnp.isfinite(init), init, 1.0).astype(jnp.float32)

    def objective(a):
        pos = jnp.all(a > 0)
        safe = jnp.where(a > 0, a, 1.0)
        value = 0.5 * _quad(safe, m, safe) - jnp.sum(jnp.log(safe))
        return jnp.where(pos, value, jnp.inf)

    def cond(carry):
        it, _, dec = carry
        return (it < max_iter) & (0.5 * dec > tol)

    def body(carry):
        it, a, _ = carry
        g = jnp.dot(m, a, precision=_HI) - 1.0 / a
        hess = m + jnp.diag(1.0 / (a * a))
        delta = jnp.linalg.solve(hess, g)
        dec = jnp.dot(g, delta)
        f0 = objective(a)

        def too_long(ls):
            j, s = ls
            return (j < 40) & (objective(a - s * delta) > f0 - 0.25 * s * dec)

        j, s = jax.lax.while_loop(too_long, lambda ls: (ls[0] + 1, 0.5 * ls[1]),
                                  (0, jnp.float32(1.0)))
        accepted = (j < 40) & jnp.isfinite(dec)
        return it + 1, jnp.where(accepted, a - s * delta, a), jnp.where(accepted, dec, 0.0)

    _, alpha, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), alpha0, jnp.float32(jnp.inf)))
    return jnp.where(present, alpha, 0.0)
