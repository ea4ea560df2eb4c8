"""Gradient balancing from the Gram matrix G G^T: MGDA, PCGrad, CAGrad, Nash-MTL, IMTL-G,
Aligned-MTL.

Each returns task WEIGHTS w [T]; the shared update is w @ G. All of them need G only through
G G^T [T, T], so `weights_from_gram` is public for an engine that assembles the Gram matrix
block by block (e.g. layer by layer) without ever holding G. `combine(G, ...)` computes it and
calls `weights_from_gram`. Weights are constants for autodiff (LibMTL detaches them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from mtlx.weighting import solvers
from mtlx.weighting.base import (GradientBalancing, WeightingState, check_inputs,
                                 check_num_tasks, grad_norms, mask_gram, masked, num_present,
                                 require, safe_div)
from mtlx.weighting.grads import gram_matrix

Array = Any
_HI = jax.lax.Precision.HIGHEST


def make_aux(weights: Array, present: Array, head_weights: Optional[Array] = None,
             param_grads: Optional[Dict[str, Array]] = None, **extra: Array) -> Dict[str, Any]:
    """The aux dict every gradient-balancing strategy returns (see `mtlx.weighting.base`)."""
    aux = {"weights": weights,
           "head_weights": present.astype(jnp.float32) if head_weights is None else head_weights,
           "param_grads": {} if param_grads is None else param_grads}
    aux.update(extra)
    return aux


class GramBalancing(GradientBalancing):
    """A strategy whose weights are a function of G G^T (and the losses)."""
    output: ClassVar[str] = "weights"

    def combine(self, grads, losses, present, state, rng, step):
        losses, present = check_inputs(self.name, losses, present, grads)
        gram = jax.lax.stop_gradient(gram_matrix(grads))
        return self.weights_from_gram(gram, jax.lax.stop_gradient(losses), present, state,
                                      rng, step)

    def weights_from_gram(self, gram: Array, losses: Array, present: Array,
                          state: WeightingState, rng: Array, step: Array
                          ) -> Tuple[Array, WeightingState, Dict[str, Any]]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class MGDA(GramBalancing):
    """MGDA-UB, Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018: the min-norm point of the convex hull of the (normalised) task gradients.

    ``solver='libmtl'`` (default) transcribes the official `MinNormSolver.find_min_norm_element`
    used by LibMTL (`solvers.min_norm_weights`), run over the present tasks only. Its stopping
    rule (L1 change of the weights < `stop_crit`) can stall above the true minimum: on one of
    eight random 5 x 8 problems in tests/test_weighting.py both LibMTL's loop and this one stop
    with a squared norm 4% above SciPy's optimum. ``solver='fista'`` (mtlx) solves the same
    problem to convergence with `solvers.min_norm_weights_fista`. `normalization` is LibMTL's
    `mgda_gn`: 'none' (default), 'l2' (g_i / ||g_i||), 'loss' (g_i / L_i), 'loss+'
    (g_i / (L_i ||g_i||)); the update is sum_i w_i g_i / gn_i, so the returned weights are
    w_i / gn_i. mtlx difference: a zero normaliser (zero gradient or zero loss) counts as 1
    instead of giving NaN.
    """
    normalization: str = "none"
    solver: str = "libmtl"
    max_iter: int = 250
    stop_crit: float = 1e-5
    name: ClassVar[str] = "mgda"
    NORMALIZATIONS: ClassVar[Tuple[str, ...]] = ("none", "l2", "loss", "loss+")
    SOLVERS: ClassVar[Tuple[str, ...]] = ("libmtl", "fista")

    def validate(self):
        require(self.normalization in self.NORMALIZATIONS, self.name, "normalization",
                f"must be one of {self.NORMALIZATIONS}, got {self.normalization!r}")
        require(self.solver in self.SOLVERS, self.name, "solver",
                f"must be one of {self.SOLVERS}, got {self.solver!r}")
        require(isinstance(self.max_iter, int) and self.max_iter >= 0, self.name, "max_iter",
                f"must be an int >= 0, got {self.max_iter!r}")
        require(self.stop_crit > 0, self.name, "stop_crit", f"must be > 0, got {self.stop_crit!r}")

    def normalizers(self, gram: Array, losses: Array, present: Array) -> Array:
        norms = grad_norms(gram)
        gn = {"none": jnp.ones_like(norms), "l2": norms, "loss": losses,
              "loss+": losses * norms}[self.normalization]
        return jnp.where(present & (gn > 0), gn, 1.0)

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        gn = self.normalizers(gram, losses, present)
        scaled = mask_gram(gram, present) / (gn[:, None] * gn[None, :])
        if self.solver == "libmtl":
            sol = solvers.min_norm_weights(scaled, present, self.max_iter, self.stop_crit)
        else:
            sol = solvers.min_norm_weights_fista(scaled, present, max(self.max_iter, 1))
        weights = masked(sol / gn, present)
        return weights, state, make_aux(weights, present, simplex_weights=sol)


def pcgrad_permutations(rng: Array, num_tasks: int) -> Array:
    """[T, T]: row i is the random order in which task i is projected against the others."""
    keys = jax.random.split(rng, num_tasks)
    return jax.vmap(lambda k: jax.random.permutation(k, num_tasks))(keys)


def pcgrad_coefficients(gram: Array, present: Array, perms: Array) -> Array:
    """C [T, T] with projected gradients pc = C @ G (PCGrad in the Gram domain).

    LibMTL's loop: for each i, for j in perms[i]: if pc_i . g_j < 0, pc_i -= (pc_i . g_j /
    ||g_j||^2) g_j. Every projection subtracts a multiple of an ORIGINAL gradient, so pc_i stays
    a combination C[i] @ G and pc_i . g_j = C[i] @ (G G^T)[:, j]: the same arithmetic on [T, T]
    instead of [T, D]. Rows of absent tasks are 0, and nothing is projected onto them.
    """
    t = gram.shape[0]
    gram = mask_gram(gram, present)
    eye = jnp.eye(t, dtype=gram.dtype)

    def row(i, perm):
        def body(k, c):
            j = perm[k]
            dot = jnp.dot(c, gram[:, j], precision=_HI)
            sq = gram[j, j]
            project = present[j] & (dot < 0) & (sq > 0)
            return c - safe_div(dot, sq, project) * eye[j]
        c = jax.lax.fori_loop(0, t, body, eye[i])
        return jnp.where(present[i], c, 0.0)

    return jax.vmap(row)(jnp.arange(t), perms)


@dataclasses.dataclass(frozen=True)
class PCGrad(GramBalancing):
    """PCGrad, Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

    Each task gradient is projected onto the normal plane of every other task gradient it
    conflicts with (negative inner product), in a random order per task drawn from `rng`
    (`pcgrad_permutations`); the update is the sum of the projected gradients. Computed exactly
    in the Gram domain (`pcgrad_coefficients`), so it returns weights on the ORIGINAL gradients:
    w = column sums of C. LibMTL refuses rep_grad for PCGrad (the projection is defined on
    parameter gradients), and so does `supports_rep_grad`.
    """
    name: ClassVar[str] = "pcgrad"
    supports_rep_grad: ClassVar[bool] = False

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        coef = pcgrad_coefficients(gram, present, pcgrad_permutations(rng, gram.shape[0]))
        weights = masked(jnp.sum(coef, axis=0), present)
        return weights, state, make_aux(weights, present, coefficients=coef)


@dataclasses.dataclass(frozen=True)
class CAGrad(GramBalancing):
    """CAGrad, Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021.

    With g0 the mean gradient and c = calpha ||g0||: w = argmin_{w in simplex}
    w^T G g0 + c ||G^T w|| (`solvers.cagrad_weights`; LibMTL uses SciPy's SLSQP), then
    d = g0 + (c / ||g_w||) g_w, divided by 1 + calpha^2 (`rescale`=1, default), 1 + calpha (2)
    or 1 (0). Returned as weights on G: (1/n + c w_i / ||g_w||) / rescale. Means are over the n
    present tasks. LibMTL refuses rep_grad for CAGrad; so does `supports_rep_grad`.
    `max_iter` caps the inner solver (it stops earlier once its step moves less than 1e-9):
    5,000 since the sixteenth session; at 500 a rank-deficient problem with gradient norms
    from 0.3 to 270 stopped 28% above the optimum of the inner objective.
    """
    calpha: float = 0.5
    rescale: int = 1
    max_iter: int = 5000
    name: ClassVar[str] = "cagrad"
    supports_rep_grad: ClassVar[bool] = False

    def validate(self):
        require(self.calpha >= 0, self.name, "calpha", f"must be >= 0, got {self.calpha!r}")
        require(self.rescale in (0, 1, 2), self.name, "rescale",
                f"must be 0, 1 or 2, got {self.rescale!r}")
        require(isinstance(self.max_iter, int) and self.max_iter > 0, self.name, "max_iter",
                f"must be a positive int, got {self.max_iter!r}")

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        gram = mask_gram(gram, present)
        n = num_present(present)
        g0_norm = jnp.sqrt(jnp.sum(gram) / jnp.maximum(n * n, 1.0) + 1e-8)
        c = self.calpha * g0_norm + 1e-8
        w = solvers.cagrad_weights(gram, present, c, self.max_iter)
        gw_norm = jnp.sqrt(jnp.maximum(jnp.dot(w, jnp.dot(gram, w, precision=_HI),
                                               precision=_HI), 0.0))
        lmbda = c / (gw_norm + 1e-8)
        scale = {0: 1.0, 1: 1.0 + self.calpha ** 2, 2: 1.0 + self.calpha}[self.rescale]
        mean = present.astype(jnp.float32) / jnp.maximum(n, 1.0)
        weights = masked((mean + lmbda * w) / scale, present)
        return weights, state, make_aux(weights, present, simplex_weights=w)


@dataclasses.dataclass(frozen=True)
class NashMTL(GramBalancing):
    """Nash-MTL, Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022.

    alpha solves G G^T alpha = 1 / alpha (the paper's bargaining solution: then
    ||sum_i alpha_i g_i|| = sqrt(T) whatever the gradients' scale). As LibMTL does, the system
    is solved normalised, M a = 1/a with M = G G^T / ||G G^T||_F (better conditioned), and
    alpha = a / sqrt(||G G^T||_F) (LibMTL multiplies the normalisation back in its
    constraints; mtlx used a itself until the sixteenth session, off by that factor, so the
    update shrank with the gradients instead of being clipped to `max_norm`),
    warm-started from the previous alpha; recomputed when step %
    `update_weights_every` == 0, else the previous alpha is reused. The shared update is
    sum_i alpha_i g_i clipped to norm `max_norm` (torch's clip_grad_norm_, 0 disables); the
    heads get alpha_i (LibMTL does one backward of sum_i alpha_i L_i and clips only the shared
    parameters).

    mtlx difference: LibMTL solves a sequence of convex approximations with CVXPY/ECOS (at most
    `optim_niter` = 20). Here `solvers.nash_bargaining_weights` runs Newton's method on the
    equivalent convex problem min 1/2 a^T M a - sum log a (cap `max_iter`), tested to satisfy
    M alpha = 1/alpha. Like LibMTL, when that fails the previous alpha is kept
    (``aux['converged']`` says which happened). Failure is max_i |alpha_i (M alpha)_i - 1| >
    `tolerance`: LibMTL's constraints are alpha_i (M alpha)_i >= 1, and when no solution exists
    (e.g. two exactly opposite gradients) the iterates run off to infinity where LibMTL's
    absolute test ||M alpha - 1/alpha|| < 1e-3 would eventually pass; the scale-free form does
    not. `ridge` > 0 added to M makes a solution always exist instead. Present tasks with a
    zero gradient cannot bargain (their equation has no solution): they keep their previous
    alpha, which then only scales their head. Recomputing every k steps saves nothing unless
    the engine also skips computing G on the other steps (lax.cond on ``step % k``).
    """
    update_weights_every: int = 1
    max_norm: float = 1.0
    max_iter: int = 100
    ridge: float = 0.0
    tolerance: float = 1e-3
    name: ClassVar[str] = "nash_mtl"
    supports_rep_grad: ClassVar[bool] = False

    def validate(self):
        require(isinstance(self.update_weights_every, int) and self.update_weights_every > 0,
                self.name, "update_weights_every",
                f"must be a positive int, got {self.update_weights_every!r}")
        require(self.max_norm >= 0, self.name, "max_norm", f"must be >= 0, got {self.max_norm!r}")
        require(isinstance(self.max_iter, int) and self.max_iter > 0, self.name, "max_iter",
                f"must be a positive int, got {self.max_iter!r}")
        require(self.ridge >= 0, self.name, "ridge", f"must be >= 0, got {self.ridge!r}")
        require(self.tolerance > 0, self.name, "tolerance",
                f"must be > 0, got {self.tolerance!r}")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        return WeightingState(stats={"alpha": jnp.ones((num_tasks,), jnp.float32)})

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        prev = state.stats["alpha"]
        check_inputs(self.name, losses, present, num_tasks=prev.shape[0])
        gram = mask_gram(gram, present)
        active = present & (jnp.diagonal(gram) > 0)
        fro = jnp.sqrt(jnp.sum(gram * gram))
        normalised = safe_div(gram, fro, fro > 0)
        scale = jnp.sqrt(fro)  # a of the normalised system = alpha * sqrt(||G G^T||_F)
        solved = solvers.nash_bargaining_weights(normalised, active, prev * scale,
                                                 self.max_iter, self.ridge)
        residual = jnp.max(masked(jnp.abs(
            solved * jnp.dot(normalised, solved, precision=_HI) - 1.0), active))
        converged = jnp.isfinite(residual) & (residual < self.tolerance)
        refresh = ((jnp.asarray(step) % self.update_weights_every) == 0) & converged
        alpha = jnp.where(refresh & active, safe_div(solved, scale, scale > 0), prev)
        new_state = state.replace(stats={"alpha": alpha})
        alpha = masked(alpha, present)
        norm = jnp.sqrt(jnp.maximum(jnp.dot(alpha, jnp.dot(gram, alpha, precision=_HI),
                                            precision=_HI), 0.0))
        clip = jnp.minimum(1.0, self.max_norm / (norm + 1e-6)) if self.max_norm > 0 else 1.0
        weights = alpha * clip
        return weights, new_state, make_aux(weights, present, head_weights=alpha, alpha=alpha,
                                            converged=converged, residual=residual)


@dataclasses.dataclass(frozen=True)
class IMTLG(GramBalancing):
    """IMTL-G, Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.

    Weights w with sum_i w_i = 1 such that d = sum_i w_i g_i has equal projections onto every
    unit task gradient u_i = g_i / ||g_i||. LibMTL's closed form anchors on task 1:
    w_{2:} = g_1 U^T (D U^T)^{-1}, D = g_1 - g_{2:}, U = u_1 - u_{2:}; here the same equations
    (d . u_1 = d . u_i, sum w = 1) are solved as one (T+1) x (T+1) linear system over the
    present tasks with non-zero gradient, via the pseudo-inverse, so the anchor may be absent and
    a singular system (parallel gradients) gives the least-squares weights instead of NaN.
    Present tasks with a zero gradient get weight 0 (u_i is undefined; LibMTL gives NaN).

    ``loss_scale=True`` adds IMTL-L as LibMTL's `IMTL` does: task losses become
    exp(s_i) L_i - s_i with learnable s (``state.params['log_scale']``, init 0); the weights
    then apply to the scaled gradients exp(s_i) g_i (returned weights include exp(s_i)), heads
    get exp(s_i), and ``aux['param_grads']`` is d/ds of sum_i (exp(s_i) L_i - s_i).
    """
    loss_scale: bool = False
    name: ClassVar[str] = "imtl_g"

    def validate(self):
        require(isinstance(self.loss_scale, bool), self.name, "loss_scale",
                f"must be a bool, got {self.loss_scale!r}")

    def init(self, num_tasks, *, grad_dim=None):
        check_num_tasks(self.name, num_tasks)
        if self.loss_scale:
            return WeightingState(params={"log_scale": jnp.zeros((num_tasks,), jnp.float32)})
        return WeightingState()

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        t = gram.shape[0]
        gram = mask_gram(gram, present)
        scale = jnp.ones((t,), jnp.float32)
        param_grads = {}
        if self.loss_scale:
            s = state.params["log_scale"]
            check_inputs(self.name, losses, present, num_tasks=s.shape[0])
            scale = jnp.exp(jax.lax.stop_gradient(s))
            gram = gram * scale[:, None] * scale[None, :]
            param_grads = {"log_scale": masked(scale * losses - 1.0, present)}
        alpha = imtl_g_weights(gram, present)
        weights = masked(alpha * scale, present)
        return weights, state, make_aux(weights, present, head_weights=masked(scale, present),
                                        param_grads=param_grads, alpha=alpha)


def imtl_g_weights(gram: Array, present: Array) -> Array:
    """IMTL-G's closed form (see `IMTLG`) for the Gram matrix of the gradients it weights."""
    t = gram.shape[0]
    norms = grad_norms(gram)
    active = present & (norms > 0)
    proj = safe_div(gram, norms[None, :], active[None, :] & active[:, None])  # g_a . u_i
    system = jnp.zeros((t + 1, t + 1), jnp.float32)
    eq_rows = jnp.concatenate([proj.T, -jnp.ones((t, 1), jnp.float32)], axis=1)
    pin_rows = jnp.concatenate([jnp.eye(t, dtype=jnp.float32), jnp.zeros((t, 1))], axis=1)
    system = system.at[:t].set(jnp.where(active[:, None], eq_rows, pin_rows))
    system = system.at[t, :t].set(active.astype(jnp.float32))
    rhs = jnp.zeros((t + 1,), jnp.float32).at[t].set(1.0)
    solution = jnp.dot(jnp.linalg.pinv(system), rhs, precision=_HI)
    return jnp.where(active, solution[:t], 0.0)


@dataclasses.dataclass(frozen=True)
class AlignedMTL(GramBalancing):
    """Aligned-MTL, Senushkin et al., "Independent Component Alignment for Multi-Task
    Learning", CVPR 2023.

    G G^T = V Lambda V^T; keep eigenvalues above max(Lambda) * n * eps (the numerical rank);
    B = sqrt(lambda_min) V Lambda^{-1/2} V^T over the kept ones; w = B 1 (LibMTL). Over the n
    present tasks; absent tasks and zero gradients fall outside the kept eigenspace and get 0.
    """
    name: ClassVar[str] = "aligned_mtl"

    def weights_from_gram(self, gram, losses, present, state, rng, step):
        gram = mask_gram(gram, present)
        lam, vecs = jnp.linalg.eigh(gram)
        tol = jnp.max(lam) * num_present(present) * jnp.finfo(jnp.float32).eps
        keep = lam > tol
        lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
        inv_sqrt = safe_div(1.0, jnp.sqrt(jnp.where(keep, lam, 1.0)), keep)
        b = jnp.matmul(vecs * inv_sqrt, vecs.T, precision=_HI)
        b = jnp.sqrt(jnp.where(jnp.any(keep), lam_min, 0.0)) * b
        weights = masked(jnp.sum(b, axis=0), present)
        return weights, state, make_aux(weights, present)
