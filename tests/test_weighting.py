"""mtlx.weighting against direct NumPy/PyTorch transcriptions of LibMTL's formulas.

The references below are written from REFERENCE.md section 3 and LibMTL's code (loops over
D-dimensional gradients, float64), independently of the JAX implementation (Gram-domain,
masked, float32). Every strategy is checked on random, conflicting, aligned and zero gradients,
with all tasks present and with absent tasks; "absent" means the result on the present tasks
equals the reference run on the present tasks alone, and absent tasks get weight 0.
"""

import dataclasses

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.optimize import minimize, root

from mtlx import weighting as W
from mtlx.weighting import solvers

T, D = 4, 12
SCENARIOS = ("random", "conflicting", "aligned", "zero")
MASKS = {"all": (1, 1, 1, 1), "one_absent": (1, 0, 1, 1), "two_absent": (0, 1, 1, 0)}


def scenario(kind, seed=0, t=T, d=D):
    r = np.random.default_rng(seed)
    if kind == "random":
        g = r.normal(size=(t, d))
    elif kind == "conflicting":
        base = r.normal(size=d)
        g = 0.3 * r.normal(size=(t, d)) + np.outer([1.0, -1.0, 0.6, -0.4][:t], base)
    elif kind == "aligned":
        base = r.normal(size=d)
        g = np.outer(r.uniform(0.5, 2.0, t), base) + 0.05 * r.normal(size=(t, d))
    elif kind == "zero":
        g = r.normal(size=(t, d))
        g[2] = 0.0
    else:
        raise ValueError(kind)
    losses = r.uniform(0.2, 2.0, t)
    return g, losses


def masked_case(kind, mask, seed=0):
    g, losses = scenario(kind, seed)
    present = np.asarray(MASKS[mask], bool)
    return g * present[:, None], losses * present, present


def embed(sub, present):
    out = np.zeros(present.shape[0])
    out[present] = sub
    return out


def as_jax(g, losses, present):
    return (jnp.asarray(g, jnp.float32), jnp.asarray(losses, jnp.float32),
            jnp.asarray(present))


KEY = jax.random.PRNGKey(42)
CASES = [(k, m) for k in SCENARIOS for m in MASKS]


_COMPILED = {}


def compiled(strategy):
    """One jitted step per strategy (equal hyperparameters share it) and its trace count.

    The step runs `combine` (Tx) or `loss` then `update` (1x) so that every test of a strategy
    reuses one compilation; the count shows whether new data or a new `present` retraced it.
    """
    if strategy not in _COMPILED:
        traces = []

        def step(g, losses, present, state, key, step):
            traces.append(1)
            return run_any(strategy, g, losses, present, state, key, step)
        _COMPILED[strategy] = (jax.jit(step), traces)
    return _COMPILED[strategy]


def run_any(s, g, losses, present, state, key=KEY, step=0):
    if s.needs_task_grads:
        return s.combine(g, losses, present, state, key, step)
    total, aux = s.loss(losses, present, state, key, step)
    more = {"next_losses": losses * 0.9} if s.needs_next_losses else {}
    state = s.update(state, losses, present, step, **more)
    return total, state, aux


@pytest.fixture(scope="module")
def jitted():
    cache = {}

    def get(strategy, fn):
        if (strategy, fn) not in cache:
            cache[(strategy, fn)] = jax.jit(getattr(strategy, fn))
        return cache[(strategy, fn)]
    return get


def combine(jitted, strategy, g, losses, present, state=None, step=0, key=KEY):
    if state is None:
        state = strategy.init(g.shape[0], grad_dim=g.shape[1])
    fn, _ = compiled(strategy)
    out, new_state, aux = fn(*as_jax(g, losses, present), state, key, jnp.int32(step))
    return np.asarray(out, np.float64), new_state, aux


def direction_of(strategy, out, g):
    return out @ g if strategy.output == "weights" else out


# =============================================================================================
# NumPy / PyTorch references (LibMTL transcriptions).

def ref_mgda(g, losses, gn_type="none"):
    """LibMTL MGDA._find_min_norm_element + _gradient_normalizers; returns the update."""
    if gn_type == "l2":
        gn = np.linalg.norm(g, axis=1)
    elif gn_type == "loss":
        gn = losses.copy()
    elif gn_type == "loss+":
        gn = losses * np.linalg.norm(g, axis=1)
    else:
        gn = np.ones(len(g))
    gn = np.where(gn > 0, gn, 1.0)  # mtlx's documented guard (LibMTL: NaN)
    grads = g / gn[:, None]

    def from2(v1v1, v1v2, v2v2):
        if v1v2 >= v1v1:
            return 0.999, v1v1
        if v1v2 >= v2v2:
            return 0.001, v2v2
        gamma = -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))
        return gamma, v2v2 + gamma * (v1v2 - v2v2)

    def proj_simplex(y):
        m = len(y)
        sorted_y = np.sort(y)[::-1]
        tmpsum = 0.0
        tmax_f = (np.sum(y) - 1.0) / m
        for i in range(m - 1):
            tmpsum += sorted_y[i]
            tmax = (tmpsum - 1) / (i + 1.0)
            if tmax > sorted_y[i + 1]:
                tmax_f = tmax
                break
        return np.maximum(y - tmax_f, 0.0)

    def next_point(cur, grad, n):
        proj = grad - np.sum(grad) / n
        tm1 = -1.0 * cur[proj < 0] / proj[proj < 0]
        tm2 = (1.0 - cur[proj > 0]) / proj[proj > 0]
        t = 1.0
        if (tm1 > 1e-7).sum() > 0:
            t = np.min(tm1[tm1 > 1e-7])
        if (tm2 > 1e-7).sum() > 0:
            t = min(t, np.min(tm2[tm2 > 1e-7]))
        return proj_simplex(proj * t + cur)

    n = len(grads)
    gm = grads @ grads.T
    if n == 1:
        sol = np.ones(1)
    else:
        dmin, best = 1e8, None
        for i in range(n):
            for j in range(i + 1, n):
                c, d = from2(gm[i, i], gm[i, j], gm[j, j])
                if d < dmin:
                    dmin, best = d, ((i, j), c)
        sol = np.zeros(n)
        sol[best[0][0]] = best[1]
        sol[best[0][1]] = 1 - best[1]
        for _ in range(250 if n >= 3 else 0):
            new_point = next_point(sol, -gm @ sol, n)
            v11, v12, v22 = sol @ gm @ sol, sol @ gm @ new_point, new_point @ gm @ new_point
            nc, _ = from2(v11, v12, v22)
            new_sol = nc * sol + (1 - nc) * new_point
            if np.sum(np.abs(new_sol - sol)) < 1e-5:
                break
            sol = new_sol
    return sol @ grads, sol


def ref_pcgrad(g, present, perms):
    grads = g
    pc = g.copy()
    for i in np.flatnonzero(present):
        for j in perms[i]:
            if not present[j]:
                continue
            gij = pc[i] @ grads[j]
            if gij < 0:
                pc[i] -= gij * grads[j] / (grads[j] @ grads[j])
    return pc[present].sum(0)


def ref_cagrad(g, calpha=0.5, rescale=1):
    gg = g @ g.T
    n = len(g)
    g0_norm = np.sqrt(gg.mean() + 1e-8)
    x0 = np.ones(n) / n
    c = calpha * g0_norm + 1e-8

    def objfn(x):
        return x @ gg @ x0 + c * np.sqrt(x @ gg @ x + 1e-8)

    res = minimize(objfn, x0, bounds=[(0, 1)] * n,
                   constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                   method="SLSQP", options={"ftol": 1e-13, "maxiter": 1000})
    w = res.x
    gw = w @ g
    lmbda = c / (np.linalg.norm(gw) + 1e-8)
    d = g.mean(0) + lmbda * gw
    return d / {0: 1.0, 1: 1 + calpha ** 2, 2: 1 + calpha}[rescale], objfn(w), objfn, c


def ref_nash_alpha(g):
    """alpha with G G^T alpha = 1/alpha (Navon et al. 2022, eq. 2; LibMTL's constraints
    alpha_i (G G^T alpha)_i >= 1, its normalisation multiplied back), by SciPy's root finder."""
    gtg = g @ g.T
    x0 = np.ones(len(g)) / np.sqrt(np.linalg.norm(gtg))
    sol = root(lambda a: gtg @ a - 1.0 / a, x0, method="hybr")
    assert np.max(np.abs(gtg @ sol.x * sol.x - 1.0)) < 1e-8
    return sol.x


def ref_imtl(g):
    """LibMTL IMTL (IMTL-G part), closed form anchored on the first task."""
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    dmat = g[0:1] - g[1:]
    umat = unit[0:1] - unit[1:]
    alpha = g[0] @ umat.T @ np.linalg.inv(dmat @ umat.T)
    return np.concatenate([[1 - alpha.sum()], alpha])


def ref_aligned(g):
    m = g @ g.T
    lmbda, v = np.linalg.eigh(m)
    tol = np.max(lmbda) * max(m.shape) * np.finfo(np.float32).eps
    rank = int(np.sum(lmbda > tol))
    order = np.argsort(lmbda)[::-1]
    lmbda, v = lmbda[order][:rank], v[:, order][:, :rank]
    b = np.sqrt(lmbda[-1]) * (v @ np.diag(1 / np.sqrt(lmbda)) @ v.T)
    return b.sum(0)


def ref_gradnorm_torch(g, losses, initial, scale, alpha=1.5):
    """LibMTL GradNorm.backward (epoch >= 1) in PyTorch; returns (weights, d L_grad / d s)."""
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    grads = torch.tensor(g, dtype=torch.float64)
    n = len(losses)
    loss_scale = n * torch.softmax(s, dim=-1)
    g_per_loss = torch.norm(loss_scale.unsqueeze(1) * grads, p=2, dim=-1)
    gm = g_per_loss.mean(0)
    l_i = torch.tensor(losses / initial, dtype=torch.float64)
    r_i = l_i / l_i.mean()
    constant = (gm * (r_i ** alpha)).detach()
    l_grad = (g_per_loss - constant).abs().sum(0)
    l_grad.backward()
    return loss_scale.detach().numpy(), s.grad.numpy(), r_i.numpy()


class RefFAMO:
    """LibMTL FAMO (loss + update_w) in PyTorch with its Adam."""

    def __init__(self, n, lr=0.025, gamma=1e-3):
        self.min_losses = torch.zeros(n, dtype=torch.float64)
        self.w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)

    def loss_weights(self, losses):
        x = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
        z = torch.softmax(self.w.detach(), -1)
        d = x - self.min_losses + 1e-8
        c = (z / d).sum().detach()
        loss = (d.log() * z / c).sum()
        loss.backward()
        return loss.item(), x.grad.numpy()

    def update(self, prev, curr):
        prev = torch.tensor(prev, dtype=torch.float64)
        curr = torch.tensor(curr, dtype=torch.float64)
        delta = (prev - self.min_losses + 1e-8).log() - (curr - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)[0]
        self.opt.zero_grad(set_to_none=False)
        self.w.grad = d
        self.opt.step()


# =============================================================================================
# Per-task-gradient strategies vs references.

@pytest.mark.parametrize("kind,mask", CASES)
@pytest.mark.parametrize("gn_type", ["none", "l2", "loss", "loss+"])
def test_mgda_matches_libmtl_min_norm_solver(jitted, kind, mask, gn_type):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("mgda", normalization=gn_type)
    out, _, aux = combine(jitted, s, g, losses, present)
    d_ref, sol_ref = ref_mgda(g[present], losses[present], gn_type)
    assert np.all(out[~present] == 0)
    scale = np.abs(g).max() ** 2
    assert abs((out @ g) @ (out @ g) - d_ref @ d_ref) < 1e-4 * scale
    if kind == "aligned" and gn_type in ("l2", "loss+"):
        return  # normalised gradients nearly equal: the min-norm weights are ill-determined
    np.testing.assert_allclose(out @ g, d_ref, rtol=2e-3, atol=2e-4 * np.abs(g).max())
    np.testing.assert_allclose(np.asarray(aux["simplex_weights"])[present], sol_ref, atol=2e-3)


def test_mgda_fista_reaches_the_min_norm_point_found_by_scipy(jitted):
    s = W.get_strategy("mgda", solver="fista")
    for seed in range(8):   # seed 2: LibMTL's solver stops 4% above the optimum (docstring)
        g, losses = scenario("random", seed, t=5, d=8)
        present = np.ones(5, bool)
        out, _, _ = combine(jitted, s, g, losses, present)
        gg = g @ g.T
        res = minimize(lambda x: x @ gg @ x, np.ones(5) / 5, bounds=[(0, 1)] * 5,
                       constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                       method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
        assert out @ gg @ out <= res.fun * (1 + 1e-5) + 1e-9
        assert abs(out.sum() - 1) < 1e-5 and np.all(out >= 0)


@pytest.mark.parametrize("kind,mask", CASES)
def test_pcgrad_matches_libmtl_projection_loop(jitted, kind, mask):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("pcgrad")
    out, _, aux = combine(jitted, s, g, losses, present)
    perms = np.asarray(W.pcgrad_permutations(KEY, T))
    assert sorted(perms[0].tolist()) == list(range(T))
    d_ref = ref_pcgrad(g, present, perms)
    np.testing.assert_allclose(out @ g, d_ref, rtol=1e-4, atol=1e-5 * np.abs(d_ref).max())
    assert np.all(out[~present] == 0)


def test_pcgrad_order_comes_from_rng(jitted):
    g, losses, present = masked_case("conflicting", "all")
    s = W.get_strategy("pcgrad")
    directions = {tuple(np.round(combine(jitted, s, g, losses, present,
                                         key=jax.random.PRNGKey(k))[0] @ g, 5))
                  for k in range(12)}
    assert len(directions) > 1  # several tasks conflict, so the order matters
    for k in range(3):
        key = jax.random.PRNGKey(k)
        d = combine(jitted, s, g, losses, present, key=key)[0] @ g
        ref = ref_pcgrad(g, present, np.asarray(W.pcgrad_permutations(key, T)))
        np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,mask,rescale", [c + (1,) for c in CASES]
                         + [("conflicting", "one_absent", 0), ("random", "all", 2)])
def test_cagrad_matches_libmtl_with_slsqp(jitted, kind, mask, rescale):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("cagrad", calpha=0.5, rescale=rescale)
    out, _, aux = combine(jitted, s, g, losses, present)
    d_ref, obj_ref, objfn, _ = ref_cagrad(g[present], 0.5, rescale)
    w = np.asarray(aux["simplex_weights"], np.float64)[present]
    assert objfn(w) <= obj_ref + 1e-5 * abs(obj_ref) + 1e-7  # as good as SLSQP
    np.testing.assert_allclose(out @ g, d_ref, rtol=3e-3, atol=3e-3 * np.abs(d_ref).max())
    assert np.all(out[~present] == 0)


_nash_solve = jax.jit(solvers.nash_bargaining_weights)


@pytest.mark.parametrize("t", [2, 3, 5, 8])
def test_nash_solver_satisfies_bargaining_equation(t):
    for seed in range(5):
        r = np.random.default_rng(100 * t + seed)
        g = r.normal(size=(t, 3 * t))       # D > T: well-conditioned G G^T
        gtg = g @ g.T
        alpha = np.asarray(_nash_solve(jnp.asarray(gtg, jnp.float32), jnp.ones(t, bool),
                                       jnp.ones(t)), np.float64)
        assert np.all(alpha > 0)
        residual = gtg @ alpha - 1.0 / alpha
        assert np.max(np.abs(residual) * alpha) < 1e-4, residual  # relative to 1/alpha
        ref = root(lambda a: gtg @ a - 1 / a, np.ones(t) / np.sqrt(np.trace(gtg))).x
        assert np.max(np.abs(gtg @ ref - 1 / ref) * ref) < 1e-8
        np.testing.assert_allclose(alpha, ref, rtol=1e-4)


@pytest.mark.parametrize("kind,mask", [c for c in CASES if c[0] != "zero"])
def test_nash_mtl_matches_bargaining_solution_and_clip(jitted, kind, mask):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("nash_mtl", max_norm=1.0)
    out, state, aux = combine(jitted, s, g, losses, present)
    alpha = embed(ref_nash_alpha(g[present]), present)
    np.testing.assert_allclose(np.asarray(aux["head_weights"]), alpha, rtol=1e-3)
    d = alpha @ g
    clip = min(1.0, 1.0 / (np.linalg.norm(d) + 1e-6))  # torch.nn.utils.clip_grad_norm_
    np.testing.assert_allclose(out @ g, clip * d, rtol=1e-3, atol=1e-6)
    assert bool(aux["converged"])
    np.testing.assert_allclose(np.asarray(state.stats["alpha"])[present], alpha[present],
                               rtol=1e-3)


def test_cagrad_default_solves_an_ill_conditioned_problem(jitted):
    """Rank-deficient (7 tasks, 5 dims), gradient norms 0.3 to 270: the default cap reaches
    the inner optimum that SLSQP finds (at the old cap of 500: -1.080 against -1.502)."""
    g = np.array([
        [-0.04298156, 0.07067849, -0.28587383, 0.15875874, -0.05026317],
        [0.34809285, 0.13266642, 0.10055862, -0.38765153, -0.32271108],
        [-0.02719319, -0.16264501, -0.13207012, -0.09150009, -0.21219185],
        [13.910093, 6.6547899, 25.259563, -16.134102, 33.862103],
        [-10.139548, 3.567502, 35.822887, 19.984159, -28.316851],
        [107.575813, 192.48175, 55.448318, 83.148972, -120.527473],
        [-0.00700359, -0.10623761, -0.28880522, -0.17393294, -0.09597842]], np.float32)
    t = len(g)
    s = W.get_strategy("cagrad")  # called directly: `compiled` counts the default's traces
    _, _, aux = jax.jit(s.combine)(jnp.asarray(g), jnp.ones(t), jnp.ones(t, bool), s.init(t),
                                   KEY, jnp.int32(0))
    gg = g.astype(np.float64) @ g.T.astype(np.float64)
    c = 0.5 * np.sqrt(gg.mean() + 1e-8) + 1e-8
    obj = lambda x: x @ gg @ np.full(t, 1 / t) + c * np.sqrt(x @ gg @ x + 1e-8)  # noqa: E731
    best = minimize(obj, np.full(t, 1 / t), bounds=[(0, 1)] * t, method="SLSQP",
                    constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
                    options={"ftol": 1e-13, "maxiter": 1000}).fun
    assert obj(np.asarray(aux["simplex_weights"], np.float64)) == pytest.approx(best, abs=1e-3)


def test_nash_mtl_is_scale_free(jitted):
    """The bargaining solution of c G is alpha / c, so the update sum_i alpha_i g_i is the
    same for any gradient scale: norm sqrt(T), clipped to max_norm. (Solving the normalised
    system alone, as before, gave alpha off by sqrt(||G G^T||_F): gradients 100x smaller gave
    an update of norm 0.012 instead of 1.)"""
    g, losses = scenario("random")
    present = np.ones(T, bool)
    s = W.get_strategy("nash_mtl", max_norm=0.0)
    updates, alphas = [], []
    for c in (1.0, 0.01, 30.0):
        out, _, aux = combine(jitted, s, c * g, losses, present)
        updates.append(out @ (c * g))
        alphas.append(np.asarray(aux["head_weights"]) * c)
    np.testing.assert_allclose(np.linalg.norm(updates[0]), np.sqrt(T), rtol=1e-3)
    for u, a in zip(updates[1:], alphas[1:]):
        np.testing.assert_allclose(u, updates[0], rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(a, alphas[0], rtol=2e-3)
    clipped, _, _ = combine(jitted, W.get_strategy("nash_mtl", max_norm=1.0), 0.01 * g, losses, present)
    np.testing.assert_allclose(np.linalg.norm(clipped @ (0.01 * g)), 1.0, rtol=1e-3)


def test_nash_mtl_keeps_previous_alpha_when_no_solution_and_between_updates(jitted):
    s = W.get_strategy("nash_mtl", update_weights_every=2, max_norm=0.0)
    g, losses = scenario("random")
    present = np.ones(T, bool)
    opposite = g.copy()
    opposite[1] = -opposite[0]                   # 0 in the hull: the game has no solution
    state = s.init(T)
    prev = W.WeightingState(stats={"alpha": jnp.asarray([0.5, 1.5, 2.0, 1.0])})
    out, new_state, aux = combine(jitted, s, opposite, losses, present, state=prev)
    assert not bool(aux["converged"])
    np.testing.assert_allclose(out, [0.5, 1.5, 2.0, 1.0], rtol=1e-6)
    # Step 1 is not an update step (every 2): the stored alpha is reused as is.
    out1, st1, _ = combine(jitted, s, g, losses, present, state=prev, step=1)
    np.testing.assert_allclose(out1, [0.5, 1.5, 2.0, 1.0], rtol=1e-6)
    out2, _, _ = combine(jitted, s, g, losses, present, state=st1, step=2)
    np.testing.assert_allclose(out2, ref_nash_alpha(g), rtol=1e-3)


def test_nash_mtl_zero_gradient_task_keeps_previous_alpha(jitted):
    g, losses, present = masked_case("zero", "all")
    s = W.get_strategy("nash_mtl", update_weights_every=2, max_norm=0.0)
    out, state, aux = combine(jitted, s, g, losses, present)
    active = np.array([True, True, False, True])
    np.testing.assert_allclose(out[active], ref_nash_alpha(g[active]), rtol=1e-3)
    assert out[2] == 1.0 and np.asarray(state.stats["alpha"])[2] == 1.0  # initial alpha


@pytest.mark.parametrize("kind,mask", CASES)
def test_imtl_g_matches_libmtl_closed_form(jitted, kind, mask):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("imtl_g")
    out, _, aux = combine(jitted, s, g, losses, present)
    active = present & (np.linalg.norm(g, axis=1) > 0)   # zero gradients get 0 (documented)
    alpha = embed(ref_imtl(g[active]), active)
    np.testing.assert_allclose(out, alpha, rtol=2e-3, atol=2e-4)
    d = out @ g
    unit = g[active] / np.linalg.norm(g[active], axis=1, keepdims=True)
    proj = unit @ d
    np.testing.assert_allclose(proj, proj[0], rtol=1e-3)   # equal projections: the definition
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-5)


def test_imtl_with_loss_scale_matches_libmtl_imtl(jitted):
    g, losses, present = masked_case("random", "all")
    s = W.get_strategy("imtl_g", loss_scale=True)
    scale = np.array([0.3, -0.2, 0.1, 0.5])
    state = W.WeightingState(params={"log_scale": jnp.asarray(scale, jnp.float32)})
    out, _, aux = combine(jitted, s, g, losses, present, state=state)
    scaled = np.exp(scale)[:, None] * g          # grads of exp(s) L - s
    alpha = ref_imtl(scaled)
    np.testing.assert_allclose(out @ g, alpha @ scaled, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["head_weights"]), np.exp(scale), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["param_grads"]["log_scale"]),
                               np.exp(scale) * losses - 1, rtol=1e-5)


@pytest.mark.parametrize("kind,mask", CASES)
def test_aligned_mtl_matches_libmtl(jitted, kind, mask):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("aligned_mtl")
    out, _, _ = combine(jitted, s, g, losses, present)
    ref = embed(ref_aligned(g[present]), present)
    np.testing.assert_allclose(out @ g, ref @ g, rtol=2e-3, atol=2e-4 * np.abs(ref @ g).max())
    assert np.all(out[~present] == 0)


@pytest.mark.parametrize("kind,mask", CASES)
def test_gradnorm_matches_libmtl_torch(jitted, kind, mask):
    g, losses, present = masked_case(kind, mask)
    s = W.get_strategy("gradnorm", alpha=1.5)
    r = np.random.default_rng(7)
    scale = r.normal(size=T)
    initial = losses * r.uniform(1.0, 3.0, T)
    # Step 0 records L(0); step 1 uses it (warmup_steps = 0: the paper's L_i(0)).
    st0 = s.init(T).replace(params={"loss_scale": jnp.asarray(scale, jnp.float32)})
    out0, st1, aux0 = combine(jitted, s, g, initial, present, state=st0, step=0)
    np.testing.assert_allclose(np.asarray(st1.stats["initial_loss_sum"]), initial * present,
                               rtol=1e-6)
    out, _, aux = combine(jitted, s, g, losses, present, state=st1, step=1)
    w_ref, ds_ref, r_ref = ref_gradnorm_torch(g[present], losses[present], initial[present],
                                              scale[present])
    np.testing.assert_allclose(out, embed(w_ref, present), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["param_grads"]["loss_scale"]),
                               embed(ds_ref, present), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["inverse_rates"]), embed(r_ref, present),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux0["inverse_rates"]), present * 1.0, rtol=1e-6)


def test_gradnorm_warmup_is_ew_and_averages_initial_losses(jitted):
    s = W.get_strategy("gradnorm", warmup_steps=2)
    g, _ = scenario("random")
    present = np.ones(T, bool)
    state = s.init(T)
    seq = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([3.0, 2.0, 1.0, 2.0]),
           np.array([1.0, 1.0, 1.0, 1.0])]
    for step, losses in enumerate(seq[:2]):
        out, state, aux = combine(jitted, s, g, losses, present, state=state, step=step)
        np.testing.assert_array_equal(out, np.ones(T))
        np.testing.assert_array_equal(np.asarray(aux["param_grads"]["loss_scale"]), 0.0)
    out, state, aux = combine(jitted, s, g, seq[2], present, state=state, step=2)
    initial = (seq[0] + seq[1]) / 2    # LibMTL: mean loss of the EW epoch
    _, ds_ref, r_ref = ref_gradnorm_torch(g, seq[2], initial, np.ones(T))
    np.testing.assert_allclose(np.asarray(aux["inverse_rates"]), r_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["param_grads"]["loss_scale"]), ds_ref,
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind,mask", CASES)
def test_db_mtl_matches_libmtl_over_steps(jitted, kind, mask):
    s = W.get_strategy("db_mtl", beta=0.9, beta_sigma=0.5)
    _, _, present = masked_case(kind, mask)
    n = int(present.sum())
    state = s.init(T, grad_dim=D)
    buffer = np.zeros((n, D))
    for step in range(3):
        g, losses = scenario(kind, seed=step)
        g, losses = g * present[:, None], losses * present
        out, state, aux = combine(jitted, s, g, losses, present, state=state, step=step)
        batch = g[present] / (losses[present] + 1e-8)[:, None]     # grads of log(L + 1e-8)
        buffer = batch + (0.9 / (step + 1) ** 0.5) * (buffer - batch)
        u = np.linalg.norm(buffer, axis=-1)
        alpha = u.max() / (u + 1e-8)
        ref = sum(alpha[i] * buffer[i] for i in range(n))
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
        nonzero = u > 0
        np.testing.assert_allclose(np.asarray(aux["weights"])[present][nonzero], alpha[nonzero],
                                   rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(state.stats["grad_ema"])[~present], 0.0)


def test_db_mtl_freezes_absent_task_ema(jitted):
    s = W.get_strategy("db_mtl")
    g, losses = scenario("random")
    state = s.init(T, grad_dim=D)
    _, state, _ = combine(jitted, s, g, losses, np.ones(T, bool), state=state, step=0)
    before = np.asarray(state.stats["grad_ema"]).copy()
    present = np.array([True, False, True, True])
    _, state, aux = combine(jitted, s, g * present[:, None], losses * present, present,
                            state=state, step=1)
    np.testing.assert_array_equal(np.asarray(state.stats["grad_ema"])[1], before[1])
    assert np.asarray(aux["weights"])[1] == 0


# =============================================================================================
# One-backward strategies vs references.

def run_loss(jitted, s, losses, present, state, step=0, key=KEY):
    total, aux = jitted(s, "loss")(jnp.asarray(losses, jnp.float32), jnp.asarray(present),
                                   state, key, jnp.int32(step))
    return float(total), aux


@pytest.mark.parametrize("mask", MASKS)
def test_ew_and_static(jitted, mask):
    _, losses, present = masked_case("random", mask)
    total, aux = run_loss(jitted, W.get_strategy("ew"), losses, present, W.WeightingState())
    np.testing.assert_allclose(total, losses[present].sum(), rtol=1e-6)
    s = W.get_strategy("static", weights=(0.5, 2.0, 1.0, 3.0))
    total, aux = run_loss(jitted, s, losses, present, s.init(T))
    w = np.array([0.5, 2.0, 1.0, 3.0]) * present
    np.testing.assert_allclose(total, (w * losses).sum(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["weights"]), w)


@pytest.mark.parametrize("mask", MASKS)
def test_uw_loss_and_log_variance_gradient(jitted, mask):
    _, losses, present = masked_case("random", mask)
    s = W.get_strategy("uw")
    state = s.init(T)
    np.testing.assert_array_equal(np.asarray(state.params["log_var"]), -0.5)  # LibMTL init
    sv = np.array([-0.5, 0.2, 1.0, -1.3])
    state = state.replace(params={"log_var": jnp.asarray(sv, jnp.float32)})
    total, aux = run_loss(jitted, s, losses, present, state)
    p = present
    np.testing.assert_allclose(total, (losses[p] / (2 * np.exp(sv[p])) + sv[p] / 2).sum(),
                               rtol=1e-6)
    grad = jax.grad(lambda params: s.loss(jnp.asarray(losses, jnp.float32), jnp.asarray(present),
                                          state.replace(params=params), KEY, 0)[0])(state.params)
    expected = (-losses / (2 * np.exp(sv)) + 0.5) * present
    np.testing.assert_allclose(np.asarray(grad["log_var"]), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mask", MASKS)
def test_dwa_matches_libmtl_epoch_buffers(jitted, mask):
    present = np.asarray(MASKS[mask], bool)
    s = W.get_strategy("dwa", steps_per_epoch=2, temperature=2.0)
    state = s.init(T)
    r = np.random.default_rng(3)
    epochs = 4
    losses_seq = r.uniform(0.2, 2.0, size=(epochs, 2, T)) * present
    buffer = np.zeros((T, epochs))            # LibMTL train_loss_buffer: epoch means
    n = int(present.sum())
    for epoch in range(epochs):
        for b in range(2):
            step = 2 * epoch + b
            losses = losses_seq[epoch, b]
            total, aux = run_loss(jitted, s, losses, present, state, step)
            if epoch > 1:
                w_i = buffer[present, epoch - 1] / buffer[present, epoch - 2]
                e = np.exp(w_i / 2.0)
                ref = n * e / e.sum()
            else:
                ref = np.ones(n)
            np.testing.assert_allclose(np.asarray(aux["weights"])[present], ref, rtol=1e-5)
            np.testing.assert_allclose(total, (ref * losses[present]).sum(), rtol=1e-5)
            state = jitted(s, "update")(state, jnp.asarray(losses, jnp.float32),
                                        jnp.asarray(present), jnp.int32(step))
        buffer[:, epoch] = losses_seq[epoch].mean(0)


def test_dwa_task_missing_from_an_epoch_gets_neutral_ratio(jitted):
    s = W.get_strategy("dwa", steps_per_epoch=1)
    state = s.init(3)
    seq = [([1.0, 1.0, 1.0], [1, 1, 0]), ([0.5, 2.0, 1.0], [1, 1, 1])]
    for step, (losses, pres) in enumerate(seq):
        state = jitted(s, "update")(state, jnp.asarray(losses) * jnp.asarray(pres),
                                    jnp.asarray(pres, bool), step)
    _, aux = jitted(s, "loss")(jnp.ones(3), jnp.ones(3, bool), state, KEY, 2)
    ratios = np.array([0.5, 2.0, 1.0])       # task 2 had no data in epoch 0: r = 1
    e = np.exp(ratios / 2.0)
    np.testing.assert_allclose(np.asarray(aux["weights"]), 3 * e / e.sum(), rtol=1e-5)


@pytest.mark.parametrize("mask", MASKS)
def test_rlw_is_softmax_of_normal_draw_over_present(jitted, mask):
    _, losses, present = masked_case("random", mask)
    s = W.get_strategy("rlw")
    for k in range(3):
        key = jax.random.PRNGKey(k)
        total, aux = run_loss(jitted, s, losses, present, W.WeightingState(), key=key)
        z = np.asarray(jax.random.normal(key, (T,)), np.float64)[present]
        ref = np.exp(z) / np.exp(z).sum()
        np.testing.assert_allclose(np.asarray(aux["weights"])[present], ref, rtol=1e-5)
        np.testing.assert_allclose(total, (ref * losses[present]).sum(), rtol=1e-5)


@pytest.mark.parametrize("dist", ["uniform", "dirichlet"])
def test_rlw_other_distributions_sum_to_one(jitted, dist):
    s = W.get_strategy("rlw", dist=dist)
    draw = jax.jit(jax.vmap(lambda k: s.loss(jnp.ones(T), jnp.ones(T, bool), W.WeightingState(),
                                             k, 0)[1]["weights"]))
    ws = np.asarray(draw(jax.random.split(KEY, 20)))
    np.testing.assert_allclose(ws.sum(1), 1.0, rtol=1e-5)
    assert ws.std(0).min() > 0     # random each step


@pytest.mark.parametrize("mask", MASKS)
def test_gls_is_geometric_mean(jitted, mask):
    _, losses, present = masked_case("random", mask)
    total, aux = run_loss(jitted, W.get_strategy("gls"), losses, present, W.WeightingState())
    n = present.sum()
    ref = np.prod(losses[present]) ** (1.0 / n)
    np.testing.assert_allclose(total, ref, rtol=1e-5)
    x = torch.tensor(losses[present], requires_grad=True)
    torch.pow(x.prod(), 1.0 / n).backward()          # LibMTL GLS
    np.testing.assert_allclose(np.asarray(aux["weights"])[present], x.grad.numpy(), rtol=1e-5)


@pytest.mark.parametrize("mask", MASKS)
def test_famo_matches_libmtl_torch_over_steps(jitted, mask):
    present = np.asarray(MASKS[mask], bool)
    s = W.get_strategy("famo", w_lr=0.025, w_gamma=1e-3, after="same_batch")
    state = s.init(T)
    ref = RefFAMO(int(present.sum()))
    r = np.random.default_rng(11)
    for step in range(5):
        losses = r.uniform(0.2, 2.0, T) * present
        nxt = losses * r.uniform(0.7, 1.1, T)
        total, aux = run_loss(jitted, s, losses, present, state, step)
        ref_total, ref_w = ref.loss_weights(losses[present])
        np.testing.assert_allclose(total, ref_total, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(aux["weights"])[present], ref_w, rtol=1e-4)
        state = jitted(s, "update")(state, jnp.asarray(losses, jnp.float32), jnp.asarray(present),
                                    jnp.int32(step), next_losses=jnp.asarray(nxt, jnp.float32))
        ref.update(losses[present], nxt[present])
        np.testing.assert_allclose(np.asarray(state.stats["w"])[present],
                                   ref.w.detach().numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.stats["w"])[~present], 0.0)


def test_famo_next_batch_pairs_consecutive_steps_losses(jitted):
    """after='next_batch': the w step at step t uses log L(t-1) - log L(t), over the tasks present
    at both steps, with the same Adam as the LibMTL reference (which is fed those pairs)."""
    s = W.get_strategy("famo")
    assert s.after == "next_batch"            # the default (FAMO docstring: why)
    state = s.init(T)
    r = np.random.default_rng(3)
    pres_seq = [(1, 1, 1, 1), (1, 0, 1, 1), (1, 1, 1, 1), (0, 1, 1, 1), (1, 1, 1, 1)]
    refs = {}                      # one LibMTL reference per set of tasks updated together
    w_ref = np.zeros(T)
    prev = prev_present = None
    for step, pres in enumerate(pres_seq):
        present = np.asarray(pres, bool)
        losses = r.uniform(0.2, 2.0, T) * present
        total, aux = run_loss(jitted, s, losses, present, state, step)
        z = np.exp(w_ref[present]) / np.exp(w_ref[present]).sum()
        d = losses[present] + 1e-8
        np.testing.assert_allclose(np.asarray(aux["weights"])[present], z / d / (z / d).sum(),
                                   rtol=1e-4)
        state = jitted(s, "update")(state, jnp.asarray(losses, jnp.float32),
                                    jnp.asarray(present), jnp.int32(step))
        if prev is not None:
            both = present & prev_present
            # A direct transcription: softmax Jacobian over `both`, Adam with per-coordinate
            # counts and L2 decay added to the gradient (torch Adam's weight_decay).
            zb = np.exp(w_ref[both]) / np.exp(w_ref[both]).sum()
            delta = np.log(prev[both] + 1e-8) - np.log(losses[both] + 1e-8)
            g = zb * delta - zb * (zb @ delta) + 1e-3 * w_ref[both]
            refs.setdefault("mu", np.zeros(T)); refs.setdefault("nu", np.zeros(T))
            refs.setdefault("n", np.zeros(T))
            refs["n"][both] += 1
            refs["mu"][both] = 0.9 * refs["mu"][both] + 0.1 * g
            refs["nu"][both] = 0.999 * refs["nu"][both] + 0.001 * g * g
            mh = refs["mu"][both] / (1 - 0.9 ** refs["n"][both])
            nh = refs["nu"][both] / (1 - 0.999 ** refs["n"][both])
            w_ref[both] = w_ref[both] - 0.025 * mh / (np.sqrt(nh) + 1e-8)
        np.testing.assert_allclose(np.asarray(state.stats["w"]), w_ref, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(state.stats["prev_present"]), present)
        prev, prev_present = losses, present
    assert np.any(w_ref != 0)
    with pytest.raises(ValueError, match="must not get next_losses"):
        s.update(state, jnp.ones(T), jnp.ones(T, bool), 0, next_losses=jnp.ones(T))


def test_famo_next_batch_equals_same_batch_when_fed_the_same_pairs(jitted):
    """Feeding 'same_batch' the pairs (L(t-1), L(t)) reproduces 'next_batch' exactly."""
    nb, sb = W.get_strategy("famo", after="next_batch"), W.get_strategy("famo", after="same_batch")
    a, b = nb.init(T), sb.init(T)
    present = np.ones(T, bool)
    r = np.random.default_rng(5)
    seq = [r.uniform(0.2, 2.0, T).astype(np.float32) for _ in range(4)]
    for step, losses in enumerate(seq):
        a = jitted(nb, "update")(a, jnp.asarray(losses), jnp.asarray(present), jnp.int32(step))
        if step:
            b = jitted(sb, "update")(b, jnp.asarray(seq[step - 1]), jnp.asarray(present),
                                     jnp.int32(step - 1), next_losses=jnp.asarray(losses))
        np.testing.assert_allclose(np.asarray(a.stats["w"]), np.asarray(b.stats["w"]), rtol=1e-6)


def test_famo_update_requires_next_losses():
    s = W.get_strategy("famo", after="same_batch")
    with pytest.raises(ValueError, match="next_losses"):
        s.update(s.init(2), jnp.ones(2), jnp.ones(2, bool), 0)


# =============================================================================================
# Properties every strategy shares.

def all_strategies():
    out = []
    for name in W.STRATEGIES:
        hp = {"static": {"weights": (1.0, 2.0, 0.5, 1.5)}, "dwa": {"steps_per_epoch": 2}}
        out.append(W.get_strategy(name, **hp.get(name, {})))
    return out


STRATS = all_strategies()


@pytest.mark.parametrize("s", STRATS, ids=lambda s: s.name)
def test_absent_tasks_get_zero_weight_no_nan_and_no_retrace(s):
    fn, traces = compiled(s)
    for i, kind in enumerate(SCENARIOS):
        for mask in list(MASKS) + ["none"]:
            g, losses = scenario(kind)
            present = np.zeros(T, bool) if mask == "none" else np.asarray(MASKS[mask], bool)
            g, losses = g * present[:, None], losses * present
            state = s.init(T, grad_dim=D)
            out, new_state, aux = fn(*as_jax(g, losses, present), state, jax.random.PRNGKey(i),
                                     jnp.int32(i))
            for leaf in jax.tree_util.tree_leaves((out, new_state, aux)):
                assert np.all(np.isfinite(np.asarray(leaf))), (s.name, kind, mask)
            w = np.asarray(aux["weights"])
            assert w.shape == (T,)
            assert np.all(w[~present] == 0), (s.name, kind, mask, w)
            if s.needs_task_grads:
                assert np.all(np.asarray(aux["head_weights"])[~present] == 0)
    # `present`, the data, the key and the step all changed: still one compilation.
    assert len(traces) == 1, (s.name, len(traces))


@pytest.mark.parametrize("s", [s for s in STRATS if not s.needs_task_grads], ids=lambda s: s.name)
def test_loss_weights_are_the_gradient_of_the_total(s):
    _, losses, present = masked_case("random", "one_absent")
    state = s.init(T)
    grad, aux = jax.jit(jax.grad(lambda l: s.loss(l, jnp.asarray(present), state, KEY, 0),
                                 has_aux=True))(jnp.asarray(losses, jnp.float32))
    np.testing.assert_allclose(np.asarray(aux["weights"]), np.asarray(grad), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("s", [s for s in STRATS if not s.needs_task_grads], ids=lambda s: s.name)
def test_a_present_task_with_zero_loss_gives_no_nan(s):
    losses = np.array([0.0, 1.0, 0.5, 2.0])
    fn, _ = compiled(s)
    state = s.init(T)
    for step in range(5):       # DWA closes two epochs: ratios with a zero mean loss
        total, state, aux = fn(*as_jax(np.zeros((T, D)), losses, np.ones(T, bool)), state, KEY,
                               jnp.int32(step))
        for leaf in jax.tree_util.tree_leaves((total, state, aux)):
            assert np.all(np.isfinite(np.asarray(leaf))), s.name


@pytest.mark.parametrize("s", STRATS, ids=lambda s: s.name)
def test_state_is_a_checkpointable_pytree(s):
    state = s.init(T, grad_dim=D)
    g, losses = scenario("random")
    _, state, _ = compiled(s)[0](*as_jax(g, losses, np.ones(T, bool)), state, KEY, jnp.int32(0))
    restored = flax.serialization.from_bytes(s.init(T, grad_dim=D),
                                             flax.serialization.to_bytes(state))
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("s", [s for s in STRATS if s.needs_task_grads], ids=lambda s: s.name)
def test_combine_contract(s):
    assert s.output in ("weights", "direction")
    g, losses = scenario("random")
    out, _, aux = combine(None, s, g, losses, np.ones(T, bool))
    assert out.shape == ((T,) if s.output == "weights" else (D,))
    assert set(aux) >= {"weights", "head_weights", "param_grads"}
    expected_params = jax.tree_util.tree_structure(s.init(T, grad_dim=D).params)
    assert jax.tree_util.tree_structure(aux["param_grads"]) == expected_params
    assert (s.output == "weights") == hasattr(s, "weights_from_gram")


def test_rep_grad_support_follows_libmtl():
    supported = {n for n, cls in W.STRATEGIES.items()
                 if getattr(cls, "needs_task_grads") and cls.supports_rep_grad}
    assert supported == {"gradnorm", "mgda", "imtl_g", "aligned_mtl"}


# =============================================================================================
# Registry and errors.

def test_unknown_strategy_lists_known_names():
    with pytest.raises(ValueError, match="known: .*'pcgrad'"):
        W.get_strategy("pc-grad-v2")
    assert W.get_strategy("Nash-MTL").name == "nash_mtl"


def test_unknown_hparam_lists_accepted_keys():
    with pytest.raises(ValueError, match="unknown hyperparameter.*'tau'.*accepted"):
        W.get_strategy("dwa", steps_per_epoch=3, tau=2.0)


BAD_HPARAMS = [
    ("static", {"weights": (1.0, -1.0)}, "weights"), ("static", {"weights": ()}, "weights"),
    ("static", {"weights": ("a",)}, "weights"),
    ("uw", {"init_log_var": float("nan")}, "init_log_var"),
    ("dwa", {}, "steps_per_epoch"), ("dwa", {"steps_per_epoch": 0}, "steps_per_epoch"),
    ("dwa", {"steps_per_epoch": 2, "temperature": 0.0}, "temperature"),
    ("rlw", {"dist": "cauchy"}, "dist"), ("gls", {"min_loss": 0.0}, "min_loss"),
    ("famo", {"w_lr": -1.0}, "w_lr"), ("famo", {"w_gamma": -1.0}, "w_gamma"),
    ("famo", {"beta1": 1.0}, "beta1"), ("famo", {"beta2": -0.1}, "beta2"),
    ("famo", {"eps": 0.0}, "eps"), ("famo", {"after": "later"}, "after"),
    ("gradnorm", {"alpha": -0.5}, "alpha"), ("gradnorm", {"warmup_steps": -1}, "warmup_steps"),
    ("mgda", {"normalization": "l1"}, "normalization"), ("mgda", {"solver": "cvx"}, "solver"),
    ("mgda", {"max_iter": -1}, "max_iter"),
    ("mgda", {"stop_crit": 0.0}, "stop_crit"),
    ("cagrad", {"calpha": -0.1}, "calpha"), ("cagrad", {"rescale": 3}, "rescale"),
    ("cagrad", {"max_iter": 0}, "max_iter"),
    ("nash_mtl", {"update_weights_every": 0}, "update_weights_every"),
    ("nash_mtl", {"max_norm": -1.0}, "max_norm"), ("nash_mtl", {"max_iter": 0}, "max_iter"),
    ("nash_mtl", {"ridge": -1e-3}, "ridge"), ("nash_mtl", {"tolerance": 0.0}, "tolerance"),
    ("imtl_g", {"loss_scale": 1}, "loss_scale"),
    ("db_mtl", {"beta": 1.0}, "beta"), ("db_mtl", {"beta_sigma": -1.0}, "beta_sigma"),
]


@pytest.mark.parametrize("name,hp,key", BAD_HPARAMS)
def test_out_of_range_hparam_names_the_key(name, hp, key):
    with pytest.raises(ValueError, match=f"'{name}'.*'{key}'"):
        W.get_strategy(name, **hp)


def test_every_strategy_has_a_bad_hparam_test_or_none_to_check():
    with_hparams = {n for n, cls in W.STRATEGIES.items() if dataclasses.fields(cls)}
    assert with_hparams <= {n for n, _, _ in BAD_HPARAMS}


def test_init_and_call_errors():
    with pytest.raises(ValueError, match="'static'.*'weights'.*3 tasks"):
        W.get_strategy("static", weights=(1.0, 2.0)).init(3)
    with pytest.raises(ValueError, match="'db_mtl'.*grad_dim"):
        W.get_strategy("db_mtl").init(3)
    with pytest.raises(ValueError, match="num_tasks"):
        W.get_strategy("ew").init(0)
    s = W.get_strategy("uw")
    with pytest.raises(ValueError, match="'uw'.*present must have shape"):
        s.loss(jnp.ones(3), jnp.ones(2, bool), s.init(3), KEY, 0)
    with pytest.raises(ValueError, match="'uw'.*initialised for 3 tasks"):
        s.loss(jnp.ones(4), jnp.ones(4, bool), s.init(3), KEY, 0)
    with pytest.raises(ValueError, match="'ew'.*losses must have shape"):
        W.get_strategy("ew").loss(jnp.ones((2, 2)), jnp.ones(2, bool), None, KEY, 0)
    with pytest.raises(ValueError, match="'mgda'.*grads must have shape"):
        W.get_strategy("mgda").combine(jnp.ones((3, 5)), jnp.ones(4), jnp.ones(4, bool),
                                       W.WeightingState(), KEY, 0)
    db = W.get_strategy("db_mtl")
    with pytest.raises(ValueError, match="'db_mtl'.*grad_dim=5"):
        db.combine(jnp.ones((2, 6)), jnp.ones(2), jnp.ones(2, bool), db.init(2, grad_dim=5),
                   KEY, 0)


# =============================================================================================
# Helpers and solvers.

def test_flatten_unflatten_round_trip():
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones((4,), jnp.bfloat16),
                                                      "d": jnp.full((1, 1, 2), 7.0)}}
    flat = W.flatten_grads(tree)
    assert flat.shape == (12,)
    back = W.unflatten_grads(flat, tree)
    for x, y in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
    batched = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), tree)
    np.testing.assert_array_equal(np.asarray(W.flatten_grads(batched, batch_dims=1)),
                                  np.stack([flat, 2 * flat]).astype(np.float32))
    with pytest.raises(ValueError, match="does not match"):
        W.unflatten_grads(jnp.ones(11), tree)
    with pytest.raises(ValueError, match="no leaves"):
        W.flatten_grads({})


@pytest.mark.parametrize("sequential", [False, True])
def test_task_gradients_equal_separate_grads(sequential):
    r = np.random.default_rng(0)
    params = {"w": jnp.asarray(r.normal(size=(3, 5)), jnp.float32),
              "b": jnp.asarray(r.normal(size=(5,)), jnp.float32)}
    x = jnp.asarray(r.normal(size=(8, 3)), jnp.float32)
    task_of_row = jnp.asarray([0, 1, 2, 0, 1, 2, 0, 0])
    y = jnp.asarray(r.normal(size=(8, 5)), jnp.float32)

    def per_task(p, x, y):
        err = jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2, axis=1)
        return jax.ops.segment_sum(err, task_of_row, num_segments=4)   # task 3 absent: 0

    g, losses = jax.jit(lambda p: W.task_gradients(per_task, p, x, y, sequential=sequential))(
        params)
    assert g.shape == (4, 20)
    refs = jax.jit(lambda p: [W.flatten_grads(jax.grad(lambda q: per_task(q, x, y)[t])(p))
                              for t in range(4)])(params)
    for t in range(4):
        np.testing.assert_allclose(np.asarray(g[t]), np.asarray(refs[t]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g[3]), 0.0)
    g2, losses2, aux = W.task_gradients(lambda p: (per_task(p, x, y), 5), params, has_aux=True)
    assert aux == 5
    np.testing.assert_allclose(np.asarray(losses2), np.asarray(losses), rtol=1e-6)


def test_pairwise_cosine_and_rep_grads():
    g, _ = scenario("zero")
    cos = np.asarray(W.pairwise_cosine(jnp.asarray(g, jnp.float32)))
    norms = np.linalg.norm(g, axis=1)
    for i in range(T):
        for j in range(T):
            ref = 0.0 if norms[i] == 0 or norms[j] == 0 else g[i] @ g[j] / (norms[i] * norms[j])
            assert abs(cos[i, j] - ref) < 1e-5
    per = np.random.default_rng(1).normal(size=(T, 3, 2, 5))
    np.testing.assert_allclose(np.asarray(W.rep_gradient_matrix(jnp.asarray(per))),
                               per.sum(1).reshape(T, -1), rtol=1e-6)
    w = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(np.asarray(W.apply_weights(jnp.asarray(w), jnp.asarray(per))),
                               np.einsum("i,i...->...", w, per), rtol=1e-6)


def test_project_to_simplex_matches_scipy():
    r = np.random.default_rng(5)
    project = jax.jit(solvers.project_to_simplex)
    for trial in range(6):
        y = r.normal(size=5) * 2
        present = np.array([True, trial % 2 == 0, True, True, trial % 3 != 0])
        p = np.asarray(project(jnp.asarray(y, jnp.float32), jnp.asarray(present)))
        k = int(present.sum())
        res = minimize(lambda x: ((x - y[present]) ** 2).sum(), np.ones(k) / k,
                       bounds=[(0, None)] * k, method="SLSQP", options={"ftol": 1e-15},
                       constraints={"type": "eq", "fun": lambda x: x.sum() - 1})
        np.testing.assert_allclose(p[present], res.x, atol=1e-5)
        assert np.all(p[~present] == 0)
