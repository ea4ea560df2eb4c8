"""mtlx.weighting end to end: tiny synthetic multi-task problems trained with optax.

Each test builds a shared encoder plus per-task heads, runs the pattern the compiled train step
uses (per-task gradients of the shared parameters -> `combine` -> shared update; heads get
``head_weights``-weighted gradients; GradNorm's ``param_grads`` go to an optimizer; UW is
differentiated jointly with the model), and checks the property the method is known for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlx import weighting as W


def regression_problem(sigmas, n=96, din=12, dout=6, seed=0, noise=None, shared_map=True):
    """Targets y_t = sigma_t tanh(x (B + eps_t)) (GradNorm's toy, Chen et al. 2018, sec. 4.1)
    plus optional Gaussian noise of std noise[t]."""
    r = np.random.default_rng(seed)
    t = len(sigmas)
    base = r.normal(size=(din, dout))
    eps = r.normal(0, 0.35, (t, din, dout))
    x = r.normal(size=(n, din)) / np.sqrt(din)
    y = np.stack([sigmas[i] * np.tanh(x @ (base + eps[i])) for i in range(t)])
    if noise is not None:
        y = y + np.asarray(noise)[:, None, None] * r.normal(size=y.shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def init_model(key, t, din, dout, hidden=24):
    k1, k2, k3 = jax.random.split(key, 3)
    shared = {"w1": jax.random.normal(k1, (din, hidden)) / np.sqrt(din),
              "w2": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden)}
    heads = {"w": jax.random.normal(k3, (t, hidden, dout)) / np.sqrt(hidden)}
    return shared, heads


def task_losses(shared, heads, x, y):
    h = jax.nn.relu(x @ shared["w1"])
    h = jax.nn.relu(h @ shared["w2"])
    pred = jnp.einsum("nh,tho->tno", h, heads["w"])
    return jnp.mean((pred - y) ** 2, axis=(1, 2))


def make_tx_step(strategy, x, y, lr=1e-2, weight_lr=0.025):
    """The per-task-gradient step: returns step(carry, i) -> (carry, logs)."""
    tx, wtx = optax.adam(lr), optax.adam(weight_lr)
    t = y.shape[0]
    present = jnp.ones((t,), bool)

    def step(carry, i):
        shared, heads, opt, wstate, wopt = carry
        grads, losses = W.task_gradients(lambda p: task_losses(p, heads, x, y), shared)
        out, wstate_new, aux = strategy.combine(grads, losses, present, wstate,
                                                jax.random.PRNGKey(i), i)
        update = W.apply_weights(out, grads) if strategy.output == "weights" else out
        g_shared = W.unflatten_grads(update, shared)
        g_heads = jax.grad(lambda h: jnp.sum(aux["head_weights"] * task_losses(shared, h, x, y)))(
            heads)
        upd, opt = tx.update((g_shared, g_heads), opt)
        shared, heads = optax.apply_updates((shared, heads), upd)
        if wstate.params:
            wupd, wopt = wtx.update(aux["param_grads"], wopt)
            wstate_new = wstate_new.replace(params=optax.apply_updates(wstate_new.params, wupd))
        logs = {"losses": losses, "weights": aux["weights"], "grads": grads, "out": out,
                "aux": aux}
        return (shared, heads, opt, wstate_new, wopt), logs

    def init(key):
        shared, heads = init_model(key, t, x.shape[1], y.shape[2])
        wstate = strategy.init(t, grad_dim=W.flatten_grads(shared).shape[0])
        return (shared, heads, tx.init((shared, heads)), wstate, wtx.init(wstate.params))

    return init, step


def train_tx(strategy, x, y, steps, key=0, **kw):
    init, step = make_tx_step(strategy, x, y, **kw)
    carry, logs = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))(
        init(jax.random.PRNGKey(key)))
    return carry, jax.tree_util.tree_map(np.asarray, logs)


# ---------------------------------------------------------------------------------------------

def test_pcgrad_removes_the_conflicting_component():
    # Two tasks pulling the shared encoder in opposite directions: y_2 ~ -y_1.
    x, y = regression_problem([1.0, 1.0], seed=1)
    y = y.at[1].set(-y[0] + 0.3 * y[1])
    s = W.get_strategy("pcgrad")
    carry, logs = train_tx(s, x, y, steps=60)
    g = logs["grads"].astype(np.float64)                 # [steps, 2, D]
    dots = np.einsum("sd,sd->s", g[:, 0], g[:, 1])
    conflicting = dots < 0
    assert conflicting.sum() >= 5, "the problem must produce conflicting gradients"
    coefficients = jax.jit(lambda gram, i: W.pcgrad_coefficients(
        gram, jnp.ones(2, bool), W.pcgrad_permutations(jax.random.PRNGKey(i), 2)))
    for i in np.flatnonzero(conflicting):
        gram = jnp.asarray(g[i] @ g[i].T, jnp.float32)
        pc = np.asarray(coefficients(gram, int(i)), np.float64) @ g[i]
        scale = np.linalg.norm(g[i], axis=1).prod()
        # Each projected gradient no longer conflicts with the other task's gradient, nor with
        # the other projected gradient.
        assert pc[0] @ g[i, 1] >= -1e-4 * scale and pc[1] @ g[i, 0] >= -1e-4 * scale
        assert pc[0] @ pc[1] >= -1e-4 * scale
        # ... and the update is their sum.
        np.testing.assert_allclose(logs["out"][i] @ g[i], pc.sum(0), rtol=1e-4,
                                   atol=1e-5 * np.abs(pc).max())
    first, last = logs["losses"][:5].mean(0), logs["losses"][-5:].mean(0)
    assert np.all(last < first)


def test_uw_learned_variances_order_tasks_by_noise():
    noise = np.array([0.05, 0.3, 1.0])
    x, y = regression_problem([1.0, 1.0, 1.0], n=256, seed=2, noise=noise)
    s = W.get_strategy("uw")
    tx = optax.adam(1e-2)

    def total(params, wparams):
        shared, heads = params
        losses = task_losses(shared, heads, x, y)
        return s.loss(losses, jnp.ones(3, bool), W.WeightingState(params=wparams),
                      jax.random.PRNGKey(0), 0)[0], losses

    def step(carry, _):
        params, wstate, opt = carry
        (_, losses), (g, gw) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
            params, wstate.params)
        upd, opt = tx.update((g, gw), opt)
        params, wparams = optax.apply_updates((params, wstate.params), upd)
        return (params, wstate.replace(params=wparams), opt), losses

    params = init_model(jax.random.PRNGKey(0), 3, x.shape[1], y.shape[2], hidden=32)
    wstate = s.init(3)
    carry = (params, wstate, tx.init((params, wstate.params)))
    (params, wstate, _), losses = jax.jit(lambda c: jax.lax.scan(step, c, None, length=600))(carry)
    log_var = np.asarray(wstate.params["log_var"])
    assert log_var[0] < log_var[1] < log_var[2], log_var
    # At UW's optimum exp(s_i) equals the task's loss (LibMTL's L / (2 e^s) + s / 2), which
    # approaches the noise variance as the fit improves.
    final = np.asarray(losses[-1])
    np.testing.assert_allclose(np.exp(log_var), final, rtol=0.3)
    assert final[0] < 0.1 < 0.3 < final[2]


def test_mgda_direction_does_not_increase_any_task_loss():
    x, y = regression_problem([1.0, 1.0, 1.0], seed=3)
    y = y.at[1].set(-y[0] + 0.5 * y[1])                 # conflicting tasks
    for solver in ("libmtl", "fista"):
        s = W.get_strategy("mgda", solver=solver)
        _, logs = train_tx(s, x, y, steps=40)
        g = logs["grads"].astype(np.float64)
        d = np.einsum("st,std->sd", logs["out"].astype(np.float64), g)
        inner = np.einsum("sd,std->st", d, g)
        scale = np.einsum("std,std->st", g, g).max(1, keepdims=True)
        assert np.all(inner >= -1e-4 * scale), (solver, inner.min())
        # The min-norm point's KKT condition: d . g_i >= ||d||^2 for every task.
        if solver == "fista":
            sq = np.einsum("sd,sd->s", d, d)[:, None]
            assert np.all(inner >= sq - 1e-3 * scale)
        assert np.any(np.einsum("std,std->s", g[:, :1], g[:, 1:2]) < 0)


def test_gradnorm_equalises_training_rates():
    # Task scales 1, 4, 12: with equal weights the big task trains fastest and the relative
    # inverse training rates spread out; GradNorm pulls them back to 1.
    x, y = regression_problem([1.0, 4.0, 12.0], n=128, seed=0)
    steps = 240

    def spread(strategy):
        _, logs = train_tx(strategy, x, y, steps=steps)
        ratio = logs["losses"] / logs["losses"][0]
        rates = ratio / ratio.mean(1, keepdims=True)
        return np.abs(rates - 1).max(1)[steps // 2:].mean(), logs

    gradnorm, logs = spread(W.get_strategy("gradnorm", alpha=1.5))
    equal, _ = spread(W.get_strategy("gradnorm", warmup_steps=10 ** 9))  # = EW, same code path
    assert gradnorm < 0.2 and gradnorm < equal / 3, (gradnorm, equal)
    np.testing.assert_allclose(logs["aux"]["inverse_rates"][-1],
                               (logs["losses"][-1] / logs["losses"][0])
                               / (logs["losses"][-1] / logs["losses"][0]).mean(), rtol=1e-4)
    w = logs["weights"][-1]
    assert w[0] > w[1] > w[2] and abs(w.sum() - 3) < 1e-4   # small task up-weighted
