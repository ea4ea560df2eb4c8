"""The train state and the ONE pure train step for every task of a mixed batch.

    strategy = mtlx.weighting.get_strategy("uw")             # or None: static weights / EW
    state = create_state(params, tx, rng, weighting_state=init_weighting(strategy, model, params))
    step_fn = make_train_step(model, tx, weighting=strategy)
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)

No Python branching on the task inside the step: task membership is data (`batch.task_ids`),
so the step compiles once per static batch shape whatever the task mix, and tasks absent from a
batch get weight 0 (their loss is exactly 0 and `present` is False; see `mtlx.weighting.base`).

Task losses. L_i is task i's mean loss over the WHOLE batch: per-example loss sums are summed per
task (segment sums) and divided by the task's count (examples or labelled tokens, from the labels
alone: `task_counts`). One forward gives the vector of per-task loss sums; everything below is
the chain rule applied to it.

Packed batches (`mtlx.data.packing.PackedBatch`: several examples a row, of one task or, with
`segments.mixed`, of several; attention block diagonal) go through the same step: the model
pools each segment (`apply_model`) and the per-task sums read sequence-level labels per
segment, token labels per row (per token on mixed rows) (`loss_sums_counts`); a packed batch
and the same examples one a row give the same step.

Task balancing (`weighting`, a strategy of `mtlx.weighting`; REFERENCE.md section 3):

* One backward ("1x": static, ew, uw, dwa, rlw, gls, famo). The forward is linearised once
  (`jax.vjp`); the strategy's objective total(L, state.params) is differentiated w.r.t. the task
  losses and its own parameters; the model's gradient is ONE pullback of the cotangent
  d total / d L_i / count_i. That is the gradient of total w.r.t. the model (chain rule), at the
  cost of `jax.grad`. FAMO's ``next_losses`` are one more forward of the same batch with the
  updated parameters (same dropout key), inside the step (FAMO's ``after='next_batch'`` option
  skips it and uses the next step's losses instead).
* Per-task gradients ("Tx": gradnorm, mgda, pcgrad, cagrad, nash_mtl, imtl_g, aligned_mtl,
  db_mtl). ``grads_wrt='params'``: the T pullbacks of the one-hot cotangents (vmap, or `lax.map`
  with ``sequential=True``) give every task's gradient of every trainable parameter. The SHARED
  trainable parameters' gradients form G [T, D]; Gram strategies only see G G^T, summed leaf by
  leaf (`GramBalancing.weights_from_gram`), so G is never concatenated into one [T, D] copy;
  DB-MTL needs the flat G. ``grads_wrt='representation'`` (LibMTL's rep_grad): the same single
  forward gets a zero offset added to a shared representation (see `representation_hook`); the T
  pullbacks are taken w.r.t. that offset only -- XLA drops the unused parameter half, so they
  cost T backward passes through the heads, not the encoder --, rows are summed over the batch
  (`rep_gradient_matrix`) and the strategy's weights w become the cotangent of ONE full
  backward, sum_i w_i L_i. Strategies whose update is not a weighting of the task gradients
  (``supports_rep_grad`` False: PCGrad, CAGrad, Nash-MTL, DB-MTL, as LibMTL) refuse this option.
  Which parameters are shared: the trainable parameters with no task name in their path.
  Task-specific ones (``heads/<task>``, per-task PEFT weights ``.../<task>/...``) get
  ``sum_i head_weights_i g_i`` -- their own task's gradient times the strategy's
  ``aux['head_weights']`` (1 for most, alpha_i for Nash-MTL, 1/L_i for DB-MTL), as LibMTL's
  per-task backward passes leave them. Frozen parameters get no gradient at all.

Memory of the per-task options (BERT-base: D = 109.5M shared parameters; T = 8 classification
tasks, batch 32 x 128, fp32, AdamW). G is T x D = 3.26 GiB; the hidden-state representation
gradients T x B x L x d = 96 MiB; pooled ones T x B x d = 0.75 MiB. XLA's buffer assignment of
the compiled step (`python scripts/bench_weighting.py --memory`, XLA:CPU; arguments 1.22 GiB =
parameters + Adam moments in every case) gives these temporaries: EW 6.14 GiB; 'params' with
vmap 7.74 GiB (+1.6: G is live once the activations are freed); 'params' with
``sequential=True`` 8.58 GiB (`lax.map` did NOT lower the peak on XLA:CPU: the forward
residuals and the stacked G dominate; check on your accelerator before relying on it);
'representation' 'hidden' 6.20 GiB, 'pooled' 6.14 GiB (no measurable cost over EW).

Trainable strategy parameters (UW's log-variances, GradNorm's loss scales, IMTL-L's scales) get
their own optax optimizer (`weighting_tx`, default Adam(1e-3)), whose state is
``TrainState.weighting_opt``: gradients w.r.t. them come from the same backward (1x, joint
differentiation of total w.r.t. (losses, state.params)) or from ``aux['param_grads']`` (Tx). A
separate optimizer, rather than the model's, because the model's optimizer is built for the
model's parameter tree (trainable masks, weight-decay masks, FSDP shardings) and fine-tuning
learning rates (2e-5) barely move a loss weight.

Gradient accumulation splits the batch into `accum_steps` microbatches inside the step
(`lax.scan`) and gives exactly the full-batch objective: per-task means are taken over the
whole batch (each microbatch's loss sums are divided by the FULL batch's per-task counts),
not averaged across microbatches. The rows of one multiple-choice question must lie in one
microbatch (its candidates are one softmax); the data pipeline keeps a question's rows
contiguous but not inside a microbatch, so the training loop refuses accumulation with
multiple-choice tasks (a caller building its own batches may arrange them). It is exact for
1x strategies whose weights d total / d L do not depend on the losses (`ACCUMULATION_EXACT`:
static, ew, uw, dwa, rlw) and for per-task strategies with ``grads_wrt='params'`` (G is a sum
over microbatches); GLS and FAMO (weights depend on the full batch's losses) and the
representation option (the weighted backward needs every microbatch's weights first) are
refused with accumulation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import flax.struct
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtlx import weighting as W
from mtlx.batch import Batch
from mtlx.models import heads as H
from mtlx.models.bert import BertEncoder, BertPooler
from mtlx.models.t5 import T5Encoder, T5Model
from mtlx.weighting.balancing import GramBalancing
from mtlx.train import optim, sharding

GRADS_WRT = ("params", "representation")
REPRESENTATIONS = ("hidden", "pooled")
# 1x strategies whose d total / d L_i does not depend on the losses, so accumulation is exact
# in one pass (checked numerically in tests/test_train_weighting.py).
ACCUMULATION_EXACT = frozenset({"static", "ew", "uw", "dwa", "rlw"})
DEFAULT_WEIGHTING_LR = 1e-3
# Heads that read the per-token hidden states rather than the pooled vector.
TOKEN_LEVEL_KINDS = ("token_classification", "span", "seq2seq")


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar
    params: Any
    opt_state: Any
    rng: jax.Array         # raw uint32 key data (checkpoint-friendly)
    weighting: Any = None  # the strategy's WeightingState (mtlx.weighting); None if stateless
    weighting_opt: Any = None  # optimizer state of the strategy's trainable parameters, if any


def default_weighting_tx(learning_rate: float = DEFAULT_WEIGHTING_LR) -> optax.GradientTransformation:
    """Adam for a strategy's trainable parameters (LibMTL trains them with Adam as well)."""
    return optax.adam(learning_rate)


def create_state(params, tx: optax.GradientTransformation, rng, weighting_state=None,
                 weighting_tx: Optional[optax.GradientTransformation] = None) -> TrainState:
    """A fresh train state. `weighting_state` from `init_weighting` (None for stateless
    strategies); `weighting_tx` must be the one given to `make_train_step` (default Adam)."""
    key = rng if rng.dtype == jnp.uint32 else jax.random.key_data(rng)
    if weighting_state is not None and not jax.tree_util.tree_leaves(weighting_state):
        weighting_state = None  # stateless: nothing to checkpoint
    weighting_opt = None
    if weighting_state is not None and weighting_state.params:
        weighting_opt = (weighting_tx or default_weighting_tx()).init(weighting_state.params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=key, weighting=weighting_state, weighting_opt=weighting_opt)


# ----------------------------------------------------------------------------- batches

def _zero_outputs(batch: Batch, tasks: Sequence[H.TaskHead],
                  sequence_rows: Optional[int] = None) -> dict:
    """Outputs of the right shapes for computing label-derived weights without a forward.
    sequence_rows: rows of the sequence-level outputs (packed batches: one per segment);
    None: the batch's rows."""
    b, l = batch.input_ids.shape
    n = b if sequence_rows is None else sequence_rows
    out = {}
    for kind in {t.kind for t in tasks}:
        w = max(H.kind_routing(tasks, kind).width, 1)
        if kind in ("classification", "multilabel"):
            out[kind] = jnp.zeros((n, w))
        elif kind in ("regression", "multiple_choice"):
            out[kind] = jnp.zeros((n,))
        elif kind == "token_classification":
            out[kind] = jnp.zeros((b, l, w))
        elif kind == "span":
            out["span_start"] = out["span_end"] = jnp.zeros((b, l))
        elif kind == "seq2seq":
            out[kind] = jnp.zeros(batch.target_ids.shape + (1,))
    return out


def unpack_batch(batch) -> Tuple[Batch, Any]:
    """(rows, segments): a packed batch (`mtlx.data.packing.PackedBatch`: several examples a
    row) gives its rows and its PackedSegments; a plain Batch gives itself and None."""
    segments = getattr(batch, "segments", None)
    return (batch.batch, segments) if segments is not None else (batch, None)


def loss_sums_counts(out: dict, batch, tasks: Sequence[H.TaskHead]):
    """(per-task loss sums [T], per-task weights [T]) of the model's outputs on a batch, plain
    or packed (`heads.packed_task_sums`: sequence-level heads per segment, token-level per row)."""
    rows, segments = unpack_batch(batch)
    if segments is None:
        return H.per_task_sums(*H.example_losses(out, rows, tasks), rows.task_ids, len(tasks))
    return H.packed_task_sums(out, rows, segments, tasks)


def apply_model(model, params, batch, deterministic: bool = True, **kwargs) -> dict:
    """model.apply on a plain or packed batch (packed: the rows plus their segments)."""
    rows, segments = unpack_batch(batch)
    if segments is not None:
        kwargs["segments"] = segments
    return model.apply({"params": params}, rows, deterministic=deterministic, **kwargs)


def task_counts(batch, tasks: Sequence[H.TaskHead]) -> jax.Array:
    """Per-task weights (examples or labelled tokens) of a batch, from its labels alone."""
    rows, segments = unpack_batch(batch)
    seq_rows = None if segments is None else segments.task_ids.size   # one per segment
    return loss_sums_counts(_zero_outputs(rows, tasks, seq_rows), batch, tasks)[1]


def _split(batch: Batch, n: int) -> Batch:
    def f(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={n}")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
    return jax.tree_util.tree_map(f, batch)


# ----------------------------------------------------------------------------- parameters

SHARED, TASK_SPECIFIC, FROZEN = "shared", "task", "frozen"


def param_roles(params: Any, task_names: Sequence[str], trainable: Any = None) -> Dict[tuple, str]:
    """{path tuple: 'shared' | 'task' | 'frozen'} for every parameter.

    Frozen: False in `trainable` (a bool pytree like `optim.trainable_mask`; None = all train).
    Task-specific: a path component equals a task name (``heads/<task>/kernel``, a per-task
    adapter ``.../lora/<task>/A``) -- the same rule the checkpointer uses for task subtrees.
    Shared: every other trainable parameter; per-task gradient strategies balance these.
    """
    flat = tu.flatten_dict(params)
    mask = None if trainable is None else tu.flatten_dict(trainable)
    names = set(task_names)
    roles = {}
    for path in flat:
        if mask is not None and not bool(mask.get(path, True)):
            roles[path] = FROZEN
        elif any(str(k) in names for k in path):
            roles[path] = TASK_SPECIFIC
        else:
            roles[path] = SHARED
    return roles


def _pick(flat: dict, roles: dict, *wanted: str) -> dict:
    return {k: v for k, v in flat.items() if roles[k] in wanted}


def shared_grad_dim(params: Any, task_names: Sequence[str], trainable: Any = None) -> int:
    """D: the number of shared trainable parameters (the width of the task-gradient matrix)."""
    roles = param_roles(params, task_names, trainable)
    flat = tu.flatten_dict(params)
    return int(sum(np.prod(np.shape(v)) for k, v in flat.items() if roles[k] == SHARED))


# ----------------------------------------------------------------------------- representation

def _backbone_family(model) -> str:
    return type(model.backbone_config).__name__


def check_representation(model, representation: str, key: str = "config.weighting.representation"):
    if representation not in REPRESENTATIONS:
        raise ValueError(f"{key}: unknown representation {representation!r}; known: "
                         f"{list(REPRESENTATIONS)}")
    if _backbone_family(model) not in ("BertConfig", "T5Config"):
        raise ValueError(f"{key}: no representation hook for backbone "
                         f"{_backbone_family(model)}")
    if representation == "pooled":
        token_level = [t.name for t in model.tasks if t.kind in TOKEN_LEVEL_KINDS]
        if token_level:
            raise ValueError(
                f"{key}='pooled': tasks {token_level} read the per-token hidden states, not the "
                f"pooled vector, so their representation gradient would be 0; use 'hidden'")


@contextlib.contextmanager
def representation_hook(model, representation: str, delta, seen: Optional[list] = None):
    """Adds `delta` to the model's shared representation during `model.apply` (Flax
    `nn.intercept_methods`; the model's code is untouched). d L / d delta at delta = 0 is the
    gradient w.r.t. the representation.

    'hidden': the encoder's last hidden state [B, L, d] -- BERT's last layer output (the pooler
    and the token-level heads both read it), T5's encoder output (after the final norm and
    dropout; the pooled mean and the decoder read it). It is LibMTL's rep_grad choice (the
    shared encoder's output) and the only representation EVERY head kind reads.
    'pooled': the pooled vector [B, d] the sequence-level heads read (BERT's pooler output or
    h[:, 0] without a pooler; T5's masked mean): L times smaller, but token-level heads never
    see it (refused by `check_representation`).
    `seen` (a list) records the sites the offset was added at, to check it happened.
    """
    bert = _backbone_family(model) == "BertConfig"
    has_pooler = bool(getattr(model.backbone_config, "add_pooler", False))
    seen = [] if seen is None else seen

    def interceptor(next_fun, args, kwargs, context):
        m, method = context.module, context.method_name
        if method == "__call__" and bert and isinstance(m, BertPooler):
            if representation == "hidden":   # the pooler reads the offset hidden state
                seen.append("pooler_input")
                return next_fun(args[0] + delta.astype(args[0].dtype), *args[1:], **kwargs)
            seen.append("pooler_output")
            out = next_fun(*args, **kwargs)
            return out + delta.astype(out.dtype)
        if method == "__call__" and bert and isinstance(m, BertEncoder):
            out = next_fun(*args, **kwargs)
            h = out.last_hidden_state
            if representation == "hidden":
                seen.append("encoder_output")
                return out.replace(last_hidden_state=h + delta.astype(h.dtype))
            if not has_pooler:                # MultiTaskModel pools h[:, 0]
                seen.append("cls_token")
                return out.replace(last_hidden_state=h.at[:, 0].add(delta.astype(h.dtype)))
            return out
        if method == "__call__" and not bert and representation == "hidden" \
                and isinstance(m, T5Encoder):
            seen.append("encoder_output")
            h, mask = next_fun(*args, **kwargs)
            return h + delta.astype(h.dtype), mask
        if method == "encode" and not bert and representation == "pooled" \
                and isinstance(m, T5Model):
            seen.append("pooled_output")
            out = next_fun(*args, **kwargs)
            return out.replace(pooled_output=out.pooled_output + delta.astype(out.pooled_output.dtype))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield seen


def representation_struct(model, params, batch: Batch, representation: str) -> jax.ShapeDtypeStruct:
    """Shape and dtype of the representation (abstract evaluation: no compute)."""
    def hidden_state(p, bt):
        found = []

        def capture(next_fun, args, kwargs, context):
            res = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, BertEncoder):
                found.append(res.last_hidden_state)
            elif context.method_name == "__call__" and isinstance(context.module, T5Encoder):
                found.append(res[0])
            return res

        with nn.intercept_methods(capture):
            model.apply({"params": p}, bt, deterministic=True)
        return found[0]

    h = jax.eval_shape(hidden_state, params, batch)
    if representation == "hidden":
        return h
    return jax.ShapeDtypeStruct((h.shape[0], h.shape[-1]), h.dtype)


# ----------------------------------------------------------------------------- strategies

def resolve_weighting(weighting, task_weights: Optional[Sequence[float]], num_tasks: int):
    """The strategy object: `weighting` (an instance, or a registry name), else static weights
    from `task_weights`, else EW. Setting both task_weights and another strategy is an error."""
    if isinstance(weighting, str):
        weighting = W.get_strategy(weighting)
    if task_weights is not None:
        n = len(np.atleast_1d(np.asarray(task_weights)))
        if n != num_tasks:
            raise ValueError(f"config.task_weights has {n} entries, the model has {num_tasks} tasks")
        if weighting is not None and weighting.name != "static":  # 'static' carries its own
            raise ValueError(f"config.task_weights is set but config.weighting.strategy is "
                             f"{weighting.name!r}: static weights are the 'static' strategy; "
                             f"unset one of them")
        if weighting is None:
            weighting = W.get_strategy("static", weights=tuple(float(w) for w in task_weights))
    if weighting is None:
        weighting = W.get_strategy("ew")
    if not hasattr(weighting, "needs_task_grads"):
        raise ValueError(f"config.weighting: expected an mtlx.weighting strategy, got "
                         f"{type(weighting).__name__}")
    return weighting


def strategy_from_config(wc, task_weights: Optional[Sequence[float]] = None):
    """The strategy of a run's `config.weighting` group (None strategy: static `task_weights`,
    or EW); errors name the config key."""
    if wc is None or wc.get("strategy", None) is None:
        return None
    kwargs = wc.get("kwargs", None) or {}
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs)
    if wc.strategy == "static" and task_weights is not None and "weights" not in kwargs:
        kwargs["weights"] = tuple(task_weights)
    try:
        return W.get_strategy(wc.strategy, **kwargs)
    except ValueError as e:
        raise ValueError(f"config.weighting.strategy / config.weighting.kwargs: {e}") from None


def check_weighting_options(strategy, model, *, grads_wrt: str = "params",
                            representation: str = "hidden", accum_steps: int = 1) -> None:
    """Raises ValueError naming the config key when a strategy and an option cannot go together."""
    name = strategy.name
    if grads_wrt not in GRADS_WRT:
        raise ValueError(f"config.weighting.grads_wrt: unknown value {grads_wrt!r}; known: "
                         f"{list(GRADS_WRT)}")
    if grads_wrt == "representation":
        if not strategy.needs_task_grads:
            raise ValueError(f"config.weighting.grads_wrt='representation': strategy {name!r} "
                             f"needs one backward and no per-task gradients; set "
                             f"grads_wrt='params' (the default)")
        if not strategy.supports_rep_grad:
            ok = sorted(n for n, c in W.STRATEGIES.items()
                        if c.needs_task_grads and c.supports_rep_grad)
            raise ValueError(f"config.weighting.grads_wrt='representation': strategy {name!r} "
                             f"defines its update on parameter gradients and cannot use "
                             f"representation gradients (LibMTL refuses it too); strategies "
                             f"that can: {ok}")
        check_representation(model, representation)
        if accum_steps > 1:
            raise ValueError(f"config.optim.accum_steps={accum_steps} with "
                             f"config.weighting.grads_wrt='representation' is not supported: the "
                             f"weighted backward needs every microbatch's weights first; use "
                             f"grads_wrt='params' or accum_steps=1")
    if accum_steps > 1 and not strategy.needs_task_grads and name not in ACCUMULATION_EXACT:
        raise ValueError(f"config.optim.accum_steps={accum_steps} with strategy {name!r} is not "
                         f"supported: its loss weights depend on the full batch's losses; "
                         f"strategies that accumulate exactly: {sorted(ACCUMULATION_EXACT)} and "
                         f"per-task strategies with grads_wrt='params'")


def init_weighting(strategy, model, params, trainable: Any = None):
    """The strategy's initial state for this model (None when it keeps none)."""
    names = [t.name for t in model.tasks]
    state = strategy.init(len(names), grad_dim=shared_grad_dim(params, names, trainable))
    return state if jax.tree_util.tree_leaves(state) else None


def _gram(tree_t: dict, t: int) -> jax.Array:
    """G G^T [T, T] summed leaf by leaf from per-task gradient leaves [T, ...]."""
    total = jnp.zeros((t, t), jnp.float32)
    for leaf in tree_t.values():
        total = total + W.gram_matrix(jnp.reshape(leaf, (t, -1)))
    return total


def _weigh(weights: jax.Array, tree_t: dict) -> dict:
    return {k: W.apply_weights(weights, v) for k, v in tree_t.items()}


# ----------------------------------------------------------------------------- the step

def make_train_step(model, tx: optax.GradientTransformation, *,
                    task_weights: Optional[Sequence[float]] = None, accum_steps: int = 1,
                    schedule: Optional[Callable] = None, weighting=None,
                    grads_wrt: str = "params", representation: str = "hidden",
                    trainable: Any = None,
                    weighting_tx: Optional[optax.GradientTransformation] = None,
                    sequential: bool = False) -> Callable:
    """Returns step(state, batch) -> (state, metrics).

    weighting: an `mtlx.weighting` strategy (or registry name); None = static `task_weights`
      (None = 1 each: LibMTL's EW). grads_wrt / representation: for per-task strategies, see the
      module docstring. trainable: bool pytree of the parameters that train (None = all); frozen
      parameters are not differentiated. weighting_tx: optimizer of the strategy's trainable
      parameters (default Adam(1e-3); `create_state` must get the same). sequential: per-task
      backward passes one at a time (`lax.map`) instead of batched (`vmap`); see the module
      docstring for what that did (not) save on XLA:CPU.

    metrics: 'loss' (sum_i task_weight_i L_i), 'task_loss' [T], 'task_count' [T],
    'task_weight' [T] (the weight each task's gradient received; 0 when absent), 'grad_norm'
    (of the trainable parameters' gradient), 'learning_rate' (if a schedule is given); 1x
    strategies add 'objective' (the differentiated total, e.g. UW's with its log-variance
    terms); per-task strategies add 'task_cosine' [T, T] (cosines of the task gradients they
    balanced).
    """
    tasks = model.tasks
    names = [tk.name for tk in tasks]
    t = len(tasks)
    if not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"config.accum_steps must be >= 1, got {accum_steps}")
    strategy = resolve_weighting(weighting, task_weights, t)
    check_weighting_options(strategy, model, grads_wrt=grads_wrt, representation=representation,
                            accum_steps=accum_steps)
    wtx = weighting_tx or default_weighting_tx()
    per_task = strategy.needs_task_grads
    use_rep = per_task and grads_wrt == "representation"

    def sums_fn(params, batch, rng, delta=None, deterministic=False):
        """Per-task loss sums [T] of one forward (optionally with the representation offset)."""
        kwargs = {} if deterministic else {"rngs": {"dropout": rng}}
        if delta is None:
            out = apply_model(model, params, batch, deterministic, **kwargs)
        else:
            seen = []
            with representation_hook(model, representation, delta, seen):
                out = model.apply({"params": params}, batch, deterministic=deterministic, **kwargs)
            if not seen:
                raise RuntimeError(f"representation hook ({representation!r}) found no site in "
                                   f"the {_backbone_family(model)} backbone")
        return loss_sums_counts(out, batch, tasks)[0]

    def map_tasks(fn, xs):
        return jax.lax.map(fn, xs) if sequential else jax.vmap(fn)(xs)

    def step(state: TrainState, batch: Batch):
        if use_rep and unpack_batch(batch)[1] is not None:
            raise ValueError("config.weighting.grads_wrt='representation' cannot be combined "
                             "with packed rows (config.data.packing): use grads_wrt='params'")
        rng = jax.random.wrap_key_data(state.rng)
        rng, step_rng = jax.random.split(rng)
        weight_rng = jax.random.fold_in(step_rng, 1)  # RLW's draw, PCGrad's order
        counts = task_counts(batch, tasks)
        present = counts > 0
        inv = jnp.where(present, 1.0 / jnp.maximum(counts, 1e-9), 0.0)

        flat = tu.flatten_dict(state.params)
        roles = param_roles(state.params, names, trainable)
        train = _pick(flat, roles, SHARED, TASK_SPECIFIC)
        frozen = _pick(flat, roles, FROZEN)
        wstate = state.weighting if state.weighting is not None else W.WeightingState()
        expected = jax.eval_shape(lambda: init_weighting(strategy, model, state.params, trainable))
        if (expected is None) != (state.weighting is None):
            raise ValueError(
                f"weighting strategy {strategy.name!r}: the train state's weighting slot does not "
                f"match the strategy (create_state(..., weighting_state=init_weighting(strategy, "
                f"model, params, trainable)))")
        if wstate.params and state.weighting_opt is None:
            raise ValueError(f"weighting strategy {strategy.name!r} has trainable parameters: "
                             f"create_state(..., weighting_tx=...) must initialise their optimizer")

        def merged(tp):
            return tu.unflatten_dict({**frozen, **tp})

        def full_batch_losses(sums):
            return jnp.where(present, sums * inv, 0.0)

        metrics = {}
        if not per_task:
            def objective(losses, wparams):
                return strategy.loss(losses, present, wstate.replace(params=wparams), weight_rng,
                                     state.step)

            obj_grad = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
            if accum_steps == 1:
                sums, pullback = jax.vjp(lambda tp: sums_fn(merged(tp), batch, step_rng), train)
                losses = full_batch_losses(sums)
                (total, aux), (g_losses, g_wparams) = obj_grad(losses, wstate.params)
                (g_train,) = pullback(g_losses * inv)
            else:
                # d total / d L does not depend on L for these strategies: take it at L = 1 and
                # accumulate the weighted microbatch gradients in one pass.
                (_, _), (g_fixed, _) = obj_grad(present.astype(jnp.float32), wstate.params)
                cot = g_fixed * inv
                micro = _split(batch, accum_steps)

                def body(carry, xs):
                    g_acc, s_acc = carry
                    i, mb = xs
                    s, pb = jax.vjp(lambda tp: sums_fn(merged(tp), mb,
                                                       jax.random.fold_in(step_rng, i)), train)
                    (g,) = pb(cot)
                    return (jax.tree_util.tree_map(jnp.add, g_acc, g), s_acc + s), None

                zeros = jax.tree_util.tree_map(jnp.zeros_like, train)
                (g_train, sums), _ = jax.lax.scan(
                    body, (zeros, jnp.zeros((t,), jnp.float32)), (jnp.arange(accum_steps), micro))
                losses = full_batch_losses(sums)
                (total, aux), (_, g_wparams) = obj_grad(losses, wstate.params)
            weights = aux["weights"]
            new_wstate = wstate
            metrics["objective"] = total
        else:
            eye_inv = jnp.eye(t, dtype=jnp.float32) * inv[None, :]  # row i: e_i / count_i
            if use_rep:
                rep = representation_struct(model, state.params, batch, representation)
                delta0 = jnp.zeros(rep.shape, rep.dtype)
                sums, pullback = jax.vjp(
                    lambda tp, d: sums_fn(merged(tp), batch, step_rng, delta=d), train, delta0)
                losses = full_batch_losses(sums)
                rep_grads = map_tasks(lambda c: pullback(c.astype(sums.dtype))[1], eye_inv)
                g_mat = W.rep_gradient_matrix(rep_grads.astype(jnp.float32))  # bf16-safe sum
                out, new_wstate, aux = strategy.combine(g_mat, losses, present, wstate,
                                                        weight_rng, state.step)
                gram = W.gram_matrix(g_mat)
                weights = aux["weights"]
                g_all = pullback(out * inv)[0]
                g_head = pullback(aux["head_weights"] * inv)[0]
                g_train = {k: (g_all[k] if roles[k] == SHARED else g_head[k]) for k in train}
            else:
                def task_grads(mb, rng_mb):
                    s, pb = jax.vjp(lambda tp: sums_fn(merged(tp), mb, rng_mb), train)
                    return map_tasks(lambda c: pb(c)[0], eye_inv), s

                if accum_steps == 1:
                    g_t, sums = task_grads(batch, step_rng)
                else:
                    micro = _split(batch, accum_steps)

                    def body(carry, xs):
                        g_acc, s_acc = carry
                        i, mb = xs
                        g, s = task_grads(mb, jax.random.fold_in(step_rng, i))
                        return (jax.tree_util.tree_map(jnp.add, g_acc, g), s_acc + s), None

                    zeros = {k: jnp.zeros((t,) + v.shape, v.dtype) for k, v in train.items()}
                    (g_t, sums), _ = jax.lax.scan(
                        body, (zeros, jnp.zeros((t,), jnp.float32)),
                        (jnp.arange(accum_steps), micro))
                losses = full_batch_losses(sums)
                shared_t = _pick(g_t, roles, SHARED)
                if not shared_t:
                    raise ValueError(f"weighting strategy {strategy.name!r} balances the shared "
                                     f"parameters' gradients, but no shared parameter trains "
                                     f"(config.trainable)")
                gram = _gram(shared_t, t)
                if isinstance(strategy, GramBalancing):
                    out, new_wstate, aux = strategy.weights_from_gram(
                        jax.lax.stop_gradient(gram), losses, present, wstate, weight_rng,
                        state.step)
                else:
                    out, new_wstate, aux = strategy.combine(
                        W.flatten_grads(shared_t, batch_dims=1), losses, present, wstate,
                        weight_rng, state.step)
                weights = aux["weights"]
                if strategy.output == "weights":
                    g_shared = _weigh(out, shared_t)
                else:
                    g_shared = W.unflatten_grads(out, _pick(train, roles, SHARED))
                g_head = _weigh(aux["head_weights"], _pick(g_t, roles, TASK_SPECIFIC))
                g_train = {**g_shared, **g_head}
            g_wparams = aux["param_grads"]
            metrics["task_cosine"] = W.cosine_from_gram(gram)

        grads = tu.unflatten_dict({**{k: jnp.zeros_like(v) for k, v in frozen.items()},
                                   **g_train})
        params, opt_state = optim.update_params(tx, sharding.constrain(grads), state.opt_state,
                                                state.params)

        weighting_opt = state.weighting_opt
        if new_wstate.params:
            w_updates, weighting_opt = wtx.update(g_wparams, state.weighting_opt,
                                                  new_wstate.params)
            moved = optax.apply_updates(new_wstate.params, w_updates)
            # An absent task's own entries stay put (Adam's momentum would move them otherwise).
            moved = jax.tree_util.tree_map(
                lambda new, old: jnp.where(present.reshape((t,) + (1,) * (new.ndim - 1)), new, old)
                if new.ndim >= 1 and new.shape[0] == t else new, moved, new_wstate.params)
            new_wstate = new_wstate.replace(params=moved)
        if not per_task:
            next_losses = None
            if strategy.needs_next_losses:  # FAMO 'same_batch': the batch after the update
                next_losses = full_batch_losses(sums_fn(params, batch, step_rng))
            new_wstate = strategy.update(new_wstate, losses, present, state.step,
                                         next_losses=next_losses)

        metrics.update({"loss": jnp.sum(weights * losses), "task_loss": losses,
                        "task_count": counts, "task_weight": weights,
                        "grad_norm": optim.global_norm(g_train)})
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng),
            weighting=None if state.weighting is None else new_wstate,
            weighting_opt=weighting_opt)
        return new_state, metrics

    step.strategy = strategy
    return step


def make_eval_step(model) -> Callable:
    """eval(params, batch) -> (predictions per kind, per-task losses, per-task counts)."""
    tasks = model.tasks

    def evaluate(params, batch):
        out = model.apply({"params": params}, batch, deterministic=True)
        losses, counts = H.task_losses(out, batch, tasks)
        return H.predictions(out, batch, tasks), losses, counts

    return evaluate


# ----------------------------------------------------------------------------- affinity probe

def make_affinity_probe(model, *, lookahead_lr: float, trainable: Any = None,
                        sequential: bool = True) -> Callable:
    """Returns probe(params, batch) -> {'cosine' [T, T], 'lookahead' [T, T], 'present' [T],
    'task_loss' [T]} for the task-affinity report (`mtlx.weighting.affinity`).

    cosine: pairwise cosines of the task gradients w.r.t. the shared trainable parameters.
    lookahead: TAG's inter-task affinity (Fifty et al., "Efficiently Identifying Task Groupings
    for Multi-Task Learning", NeurIPS 2021), Z[i, j] = 1 - L_j(theta_s - lr g_i) / L_j(theta_s):
    how an SGD step of the shared parameters on task i alone changes task j's loss on the same
    batch (heads unchanged). Both without dropout, so they reflect the parameters only. Memory:
    G [T, D] plus one forward at a time (`sequential`: the T backward passes too).
    """
    from mtlx.weighting import affinity as A

    tasks = model.tasks
    names = [tk.name for tk in tasks]
    t = len(tasks)
    if not (np.isfinite(lookahead_lr) and lookahead_lr > 0):
        raise ValueError(f"config.weighting.report.lookahead_lr must be > 0, got {lookahead_lr!r}")

    def probe(params, batch):
        counts = task_counts(batch, tasks)
        present = counts > 0
        inv = jnp.where(present, 1.0 / jnp.maximum(counts, 1e-9), 0.0)
        flat = tu.flatten_dict(params)
        roles = param_roles(params, names, trainable)
        shared = _pick(flat, roles, SHARED)
        rest = _pick(flat, roles, TASK_SPECIFIC, FROZEN)

        def losses_of(sh):
            out = apply_model(model, tu.unflatten_dict({**rest, **sh}), batch, True)
            return loss_sums_counts(out, batch, tasks)[0] * inv

        losses, pullback = jax.vjp(losses_of, shared)
        eye = jnp.eye(t, dtype=losses.dtype)
        fn = lambda c: pullback(c)[0]  # noqa: E731
        g_t = jax.lax.map(fn, eye) if sequential else jax.vmap(fn)(eye)
        cosine = W.cosine_from_gram(_gram(g_t, t))

        def after(i):
            return losses_of({k: v - lookahead_lr * g_t[k][i].astype(v.dtype)
                              for k, v in shared.items()})

        after_losses = jax.lax.map(after, jnp.arange(t))
        return {"cosine": cosine, "lookahead": A.lookahead_affinity(losses, after_losses, present),
                "present": present, "task_loss": losses}

    return probe


# ----------------------------------------------------------------------------- host checks

def count_compilations(fn) -> int:
    """Number of distinct compiled executables held by a jitted function's cache."""
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else -1


def finite_or_raise(metrics: dict, step: int, task_names: Sequence[str]) -> None:
    """Host-side NaN/Inf check after a step: names the step and the task(s) at fault."""
    loss = np.asarray(metrics["task_loss"])
    bad = [task_names[i] for i in np.flatnonzero(~np.isfinite(loss))]
    if bad or not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(
            f"non-finite loss at step {step}: tasks {bad or 'unknown'} "
            f"(task losses {dict(zip(task_names, loss.tolist()))}); the last good checkpoint is kept")
