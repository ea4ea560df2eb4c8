"""What the benchmark measures: model sizes, configurations, features, synthetic batches, and
the mtlx side of a cell (model, train state, the library's compiled step).

A *cell* is (configuration, size, sequence length, number of tasks, batch size, features):

  sizes           tiny: BERT-tiny (L=2, H=128, A=2, Turc et al. 2019, "Well-Read Students
                  Learn Better"); base: BERT-base (L=12, H=768, A=12, Devlin et al. 2019).
  configurations  shared: one encoder + a head per task, everything trains (MT-DNN);
                  adapters: Houlsby bottleneck adapters per task (reduction 16, swish, as
                  AdapterHub's "houlsby" config), backbone frozen;
                  lora: LoRA per task on query and value (r 8, alpha 16), backbone frozen;
                  hyperformer++: HyperFormer++ (Karimi Mahabadi et al. 2021), backbone frozen.
                  Frozen configurations train the extension, the heads and the backbone's
                  LayerNorms (mtlx.peft.registry.trainable_patterns), on both sides.
  tasks           T classification tasks 'task00'.. with 2, 3, 4, 2, ... labels.
  batches         B full-length rows (no padding: every position is real work) of random token
                  ids; row i of step s belongs to task (s B + i) mod T, so each step mixes
                  min(B, T) tasks and successive steps cycle through all of them; labels in
                  {0, 1} (valid for every task).
  features        dtype (float32 | bfloat16 compute, float32 master weights), attention
                  implementation (None = XLA's choice, 'xla', 'cudnn'), remat policy, buffer
                  donation.

The step is the library's own: `mtlx.train.step.make_train_step` with the optimizer of
`mtlx.train.optim.make_optimizer` (AdamW, weight decay 0.01, global-norm clipping at 1.0),
jitted on one device with the old state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

SIZES = {
    "tiny": dict(vocab_size=30522, hidden_size=128, num_layers=2, num_heads=2,
                 intermediate_size=512, max_position_embeddings=512),
    "base": dict(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072, max_position_embeddings=512),
}

CONFIGS = {
    "shared": (),
    "adapters": ({"method": "adapter", "variant": "houlsby", "reduction_factor": 16},),
    "lora": ({"method": "lora", "rank": 8, "alpha": 16.0,
              "targets": ["attention.query", "attention.value"]},),
    "hyperformer++": ({"method": "hyperformer++", "reduction_factor": 32},),
}
# Whether the encoder's own weights train in each configuration.
BACKBONE_TRAINS = {"shared": True, "adapters": False, "lora": False, "hyperformer++": False}

DTYPES = ("float32", "bfloat16")
# threefry2x32 is JAX's default; 'rbg' / 'unsafe_rbg' use XLA's RngBitGenerator, much cheaper
# per random bit (dropout draws B x L x d bits per sublayer and B x H x L x L for attention).
PRNGS = ("threefry2x32", "rbg", "unsafe_rbg")
ACTIVATION_VJPS = ("auto", "saved_input", "autodiff")
DROPOUT_DRAWS = ("hash16", "bernoulli")
GATHER_GRADS = ("auto", "onehot", "scatter")
LAYER_NORM_VJPS = ("saved_inputs", "autodiff")
GRAD_NORMS = ("grouped", "per_leaf")
STACK_STATES = ("auto", "on", "off")
OPTIMIZERS = ("adamw", "adafactor", "sgd")  # mtlx.train.optim.OPTIMIZERS (no jax import here)
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.01, 1.0
HIDDEN_DROPOUT, ATTENTION_DROPOUT, HEAD_DROPOUT = 0.1, 0.1, 0.1


@dataclasses.dataclass(frozen=True)
class Features:
    """Throughput switches of the mtlx step (each measured on and off by the harness)."""
    dtype: str = "float32"
    attention: Optional[str] = None   # None | 'xla' | 'cudnn'
    remat: str = "none"               # mtlx.models.remat policy
    donate: bool = True
    attention_dropout: float = ATTENTION_DROPOUT
    # Dropout on the sublayers' outputs (BertConfig.hidden_dropout). Not a throughput switch of
    # the same model: 0 measures what dropout (its random bits and masks) costs a step.
    hidden_dropout: float = HIDDEN_DROPOUT
    # GELU's gradient (mtlx.models.activations policy): 'auto' (the saved input, on every
    # platform), 'saved_input' or 'autodiff': the A/B of that choice.
    activation_vjp: str = "auto"
    # Dropout's draws (mtlx.models.dropout policy): 'hash16' (four 16-bit draws a threefry
    # hash, the default) or 'bernoulli' (flax's float draw per element): the A/B.
    dropout_draws: str = "hash16"
    # The 'gather' routing's gradient (mtlx.peft.routing.gather_grad policy): 'auto' (a one-hot
    # contraction on accelerators, the scatter-add on a CPU), 'onehot' or 'scatter': the A/B.
    gather_grad: str = "auto"
    # BERT's residual LayerNorm gradient (mtlx.models.norms policy): 'saved_inputs' (the
    # default) or 'autodiff': the A/B.
    layer_norm_vjp: str = "saved_inputs"
    # The global gradient norm (clipping, the grad_norm metric; mtlx.train.optim policy):
    # 'grouped' (leaves concatenated in chunks, the default) or 'per_leaf' (optax's): the A/B.
    grad_norm: str = "grouped"
    # The train state at the step's jit boundary (mtlx.train.stacking, config.stack_state):
    # 'auto' (small same-shaped leaves stacked from 1,024 leaves on, as the loop does), 'on',
    # 'off': the A/B of the host's per-array dispatch work.
    stack_state: str = "auto"
    # The optimizer (mtlx.train.optim: 'adamw', the baseline's; 'adafactor' or 'sgd'): not a
    # switch of the same step, measured against AdamW or on its own (its stacked update).
    optimizer: str = "adamw"
    prng: str = "threefry2x32"          # dropout's random bits: JAX's PRNG implementation
    scan_layers: bool = False         # BertConfig.scan_layers: the layers as one lax.scan
    routing: Optional[str] = None     # the PEFT methods' 'impl' (mtlx.peft.routing); None: theirs
    dots: str = "auto"                # mtlx.models.precision policy of bf16 products
    frozen_dtype: Optional[str] = None  # frozen kernels stored in it (= dtype; optim.cast_frozen_kernels)

    def __post_init__(self):
        from mtlx.models.attention import IMPLEMENTATIONS
        from mtlx.models.remat import check_policy
        if self.routing is not None:
            from mtlx.peft.routing import check_impl
            check_impl(self.routing, "Features.routing")
        from mtlx.models.precision import POLICIES
        for name, choices in (("dtype", DTYPES), ("attention", IMPLEMENTATIONS),
                              ("dots", POLICIES), ("prng", PRNGS),
                              ("activation_vjp", ACTIVATION_VJPS), ("dropout_draws", DROPOUT_DRAWS),
                              ("gather_grad", GATHER_GRADS), ("layer_norm_vjp", LAYER_NORM_VJPS),
                              ("grad_norm", GRAD_NORMS), ("stack_state", STACK_STATES),
                              ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"mtlx/bench/workload.py: Features.{name} must be one of "
                                 f"{choices}, got {getattr(self, name)!r}")
        check_policy(self.remat, "Features.remat")
        if self.frozen_dtype is not None and self.frozen_dtype != self.dtype:
            raise ValueError(f"mtlx/bench/workload.py: Features.frozen_dtype must be None or the "
                             f"compute dtype {self.dtype!r}, got {self.frozen_dtype!r}")
        if self.attention == "cudnn" and self.attention_dropout > 0:
            # cuDNN's fused kernel cannot drop attention probabilities (mtlx.models.bert).
            raise ValueError(f"mtlx/bench/workload.py: Features.attention='cudnn' needs "
                             f"attention_dropout=0.0, got {self.attention_dropout}")

    def describe(self) -> str:
        return (f"{self.dtype}, attention={self.attention or 'default'}, remat={self.remat}, "
                f"donate={'on' if self.donate else 'off'}, attention_dropout={self.attention_dropout}, "
                f"prng={self.prng}, scan_layers={'on' if self.scan_layers else 'off'}"
                + (f", routing={self.routing}" if self.routing else "")
                + (f", dots={self.dots}" if self.dots != "auto" else "")
                + (f", frozen kernels {self.frozen_dtype}" if self.frozen_dtype else "")
                + (f", activation_vjp={self.activation_vjp}"
                   if self.activation_vjp != "auto" else "")
                + (f", dropout_draws={self.dropout_draws}"
                   if self.dropout_draws != "hash16" else "")
                + (f", gather_grad={self.gather_grad}" if self.gather_grad != "auto" else "")
                + (f", layer_norm_vjp={self.layer_norm_vjp}" if self.layer_norm_vjp != "saved_inputs" else "")
                + (f", grad_norm={self.grad_norm}" if self.grad_norm != "grouped" else "")
                + (f", stack_state={self.stack_state}" if self.stack_state != "auto" else "")
                + (f", optimizer={self.optimizer}" if self.optimizer != "adamw" else "")
                + (f", hidden_dropout={self.hidden_dropout}"
                   if self.hidden_dropout != HIDDEN_DROPOUT else ""))


def feature_value(features: Features, field: str, text: str):
    """A command line's text for one Features field, typed like the field's current value:
    a bool from 1/true/on/yes, a number for a number, None for 'none', else the text
    (scripts/profile_step.py's 'cell:field=value', scripts/ab_features.py's A and B). The
    field must exist (each script names an unknown one in its own words)."""
    current = getattr(features, field)
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "on", "yes")
    if isinstance(current, (int, float)):
        return type(current)(text)
    if text.lower() == "none":
        return None
    return text


def parse_variant(text: str, features: Features, where: str) -> Tuple[Cell, str]:
    """'config/size/L/T/B[:field=value,...]' -> (the Cell with these Features overrides on
    `features`, the cell's text without them): scripts/profile_step.py's and
    scripts/ab_features.py's --cell. Errors name `where` (the script) and the bad part."""
    cell_text, _, rest = text.partition(":")
    parts = cell_text.split("/")
    if len(parts) != 5:
        raise SystemExit(f"{where}: --cell {text!r} must be config/size/L/T/B[:field=value,...]")
    fields = {f.name for f in dataclasses.fields(features)}
    over = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise SystemExit(f"{where}: --cell {text!r}: {item!r} must be field=value")
        if key not in fields:
            raise SystemExit(f"{where}: --cell {text!r}: unknown feature {key!r}; "
                             f"known: {sorted(fields)}")
        over[key] = feature_value(features, key, value.strip())
    c, s, l, t, b = parts
    return Cell(c, s, int(l), int(t), int(b), dataclasses.replace(features, **over)), cell_text


def features_for(dtype: str, attention: str = "default", **kw) -> Features:
    """Features from command-line choices (scripts/bench.py, scripts/profile_step.py):
    attention 'default' | 'xla' | 'cudnn'; cuDNN's fused kernel cannot drop attention
    probabilities, so 'cudnn' comes with attention_dropout=0."""
    att = None if attention == "default" else attention
    return Features(dtype=dtype, attention=att,
                    attention_dropout=0.0 if att == "cudnn" else ATTENTION_DROPOUT, **kw)


@dataclasses.dataclass(frozen=True)
class Cell:
    config: str
    size: str
    seq_len: int
    num_tasks: int
    batch_size: int
    features: Features = Features()

    def __post_init__(self):
        if self.config not in CONFIGS:
            raise ValueError(f"mtlx/bench/workload.py: unknown configuration {self.config!r}; "
                             f"known: {list(CONFIGS)}")
        if self.size not in SIZES:
            raise ValueError(f"mtlx/bench/workload.py: unknown size {self.size!r}; known: {list(SIZES)}")
        for key in ("seq_len", "num_tasks", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"mtlx/bench/workload.py: Cell.{key} must be >= 1, got "
                                 f"{getattr(self, key)!r}")
        if self.seq_len > SIZES[self.size]["max_position_embeddings"]:
            raise ValueError(f"mtlx/bench/workload.py: seq_len {self.seq_len} exceeds the "
                             f"{self.size} model's {SIZES[self.size]['max_position_embeddings']} positions")

    @property
    def label(self) -> str:
        return f"{self.config}/{self.size}/L{self.seq_len}/T{self.num_tasks}/B{self.batch_size}"


def task_heads(num_tasks: int) -> tuple:
    from mtlx.models.heads import TaskHead
    return tuple(TaskHead(f"task{i:02d}", "classification", 2 + i % 3) for i in range(num_tasks))


def backbone_config(cell: Cell, task_names: Optional[Sequence[str]] = None):
    """The BertConfig of a cell, extensions of its configuration attached (for `task_names`,
    default the cell's synthetic tasks)."""
    import jax.numpy as jnp
    from mtlx.models.bert import BertConfig
    from mtlx.peft import registry
    f = cell.features
    cfg = BertConfig(**SIZES[cell.size], hidden_dropout=f.hidden_dropout,
                     attention_dropout=f.attention_dropout, dtype=jnp.dtype(f.dtype),
                     param_dtype=jnp.float32, attention_impl=f.attention, remat=f.remat,
                     scan_layers=f.scan_layers)
    methods = CONFIGS[cell.config]
    if methods and f.routing:
        methods = tuple(dict(m, impl=f.routing) for m in methods)
    if methods:
        names = task_names or [t.name for t in task_heads(cell.num_tasks)]
        cfg = registry.attach(cfg, methods, list(names))
    return cfg


def step_task_ids(step: int, batch_size: int, num_tasks: int) -> np.ndarray:
    """Row i of step s belongs to task (s B + i) mod T."""
    return ((step * batch_size + np.arange(batch_size)) % num_tasks).astype(np.int32)


def synthetic_arrays(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Random full-length rows: input_ids, attention_mask, token_type_ids [B, L], labels [B]."""
    rng = np.random.default_rng(seed)
    half = seq_len // 2
    types = np.zeros((batch_size, seq_len), np.int32)
    types[:, half:] = 1  # sentence pairs, as most GLUE tasks
    low = min(1000, vocab_size // 2)  # past BERT's special and unused ids when there are any
    return {"input_ids": rng.integers(low, vocab_size, (batch_size, seq_len)).astype(np.int32),
            "attention_mask": np.ones((batch_size, seq_len), np.int32),
            "token_type_ids": types,
            "labels": rng.integers(0, 2, batch_size).astype(np.int32)}


def mixed_batches(cell: Cell, num: int = 4, seed: int = 0) -> list:
    """`num` mtlx Batches of the cell (steps 0..num-1 of the task rotation)."""
    from mtlx.batch import make_batch
    vocab = SIZES[cell.size]["vocab_size"]
    out = []
    for s in range(num):
        a = synthetic_arrays(cell.batch_size, cell.seq_len, vocab, seed + s)
        out.append(make_batch(task_ids=step_task_ids(s, cell.batch_size, cell.num_tasks), **a))
    return out


class OptimConfig(dict):
    """The optimizer section mtlx.train.optim reads (a dict with attribute access, so the
    benchmark does not need ml_collections)."""
    __getattr__ = dict.__getitem__


def optim_config(optimizer: str = "adamw") -> OptimConfig:
    return OptimConfig(optimizer=optimizer, learning_rate=LEARNING_RATE, warmup_steps=0,
                       num_train_steps=1_000_000, schedule="constant",
                       weight_decay=WEIGHT_DECAY, grad_clip_norm=CLIP_NORM)


@dataclasses.dataclass
class MtlxSetup:
    cell: Cell
    model: Any
    state: Any
    step: Any           # the jitted train step
    batches: List[Any]  # device-resident mtlx Batches
    trainable: Any      # bool pytree, or None (everything trains)
    flops: Any          # mtlx.bench.flops.StepFlops
    param_count: int
    trainable_count: int


# Features read while the step is traced (traced_with), in the order their scopes are entered.
TRACE_TIME_FIELDS = ("prng", "dots", "activation_vjp", "dropout_draws", "gather_grad",
                     "layer_norm_vjp", "grad_norm")


def traced_with(step_fn, features: Features):
    """The step traced with the features' trace-time settings: `prng` as JAX's default PRNG
    (the train state's raw key data is wrapped with the default implementation inside
    mtlx.train.step), `dots` as mtlx.models.precision's policy, `activation_vjp`
    (mtlx.models.activations.policy), `dropout_draws` (mtlx.models.dropout.policy),
    `gather_grad` (mtlx.peft.routing.gather_grad), `layer_norm_vjp`
    (mtlx.models.norms.policy) and `grad_norm` (mtlx.train.optim.grad_norm_policy)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Features)}
    if all(getattr(features, name) == defaults[name] for name in TRACE_TIME_FIELDS):
        return step_fn

    def step(state, batch):
        import contextlib
        import jax
        from mtlx.models import activations, dropout, norms, precision
        from mtlx.peft import routing
        from mtlx.train import optim
        scopes = {"prng": jax.default_prng_impl, "dots": precision.policy,
                  "activation_vjp": activations.policy, "dropout_draws": dropout.policy,
                  "gather_grad": routing.gather_grad, "layer_norm_vjp": norms.policy,
                  "grad_norm": optim.grad_norm_policy}
        with contextlib.ExitStack() as stack:
            for name in TRACE_TIME_FIELDS:
                stack.enter_context(scopes[name](getattr(features, name)))
            return step_fn(state, batch)
    return step


def build_mtlx(cell: Cell, seed: int = 0, num_batches: int = 4, device=None,
               heads: Optional[Sequence[Any]] = None,
               batches: Optional[Sequence[Any]] = None) -> MtlxSetup:
    """Model, initial train state, jitted step (not yet compiled) and batches of a cell.

    heads / batches: the tasks and (plain or packed) batches to train on instead of the cell's
    synthetic ones (all batches of one shape); the FLOPs are counted on the first batch's rows
    (every row at its full length)."""
    import jax
    from mtlx.bench.flops import step_flops
    from mtlx.models.multitask import MultiTaskModel, init_params
    from mtlx.peft import registry
    from mtlx.train import optim, stacking
    from mtlx.train.step import create_state, make_train_step, unpack_batch

    device = device or jax.devices()[0]
    heads = tuple(heads) if heads is not None else task_heads(cell.num_tasks)
    cfg = backbone_config(cell, [h.name for h in heads])
    model = MultiTaskModel(cfg, heads, head_dropout=HEAD_DROPOUT)
    if batches is None:
        batches = mixed_batches(cell, num_batches, seed)
    batches = [jax.device_put(b, device) for b in batches]
    rows0 = unpack_batch(batches[0])[0]
    with jax.default_device(device):
        # Eager, on a 1 x 8 slice: parameter shapes do not depend on the batch, and jitting the
        # init compiles one program per parameter leaf (slow with many tasks' adapters).
        probe = jax.tree_util.tree_map(lambda x: x[:1, :8] if x.ndim == 2 else x[:1], rows0)
        params = init_params(model, jax.random.key(seed), probe)
        trainable = None
        if not BACKBONE_TRAINS[cell.config]:
            trainable = optim.trainable_mask(params, registry.trainable_patterns(cfg))
            params = optim.cast_frozen_kernels(params, trainable, cell.features.frozen_dtype,
                                               cfg.dtype, key="Features.frozen_dtype")
        tx = optim.make_optimizer(optim_config(cell.features.optimizer), params, trainable)
        # Not jitted: XLA would merge equal outputs (Adam's zero moments) into one buffer, and a
        # state holding one buffer twice cannot be donated twice.
        state = create_state(params, tx, jax.random.key(seed + 1, impl=cell.features.prng))
    # Committed to the device like the step's outputs: a first call with uncommitted arrays
    # would compile an executable that the second call (committed state) cannot reuse.
    state = jax.device_put(state, device)
    del params
    leaves = jax.tree_util.tree_leaves(state.params)
    # `trainable` as the training loop passes it: frozen backbone weights are not differentiated.
    plan = None
    if stacking.wants_stacking(cell.features.stack_state, state, key="Features.stack_state"):
        # As the loop does (mtlx.train.loop): the state crosses the jit boundary stacked and
        # the update runs on the stacks.
        plan = stacking.StackPlan.for_tree(state)
        tx = optim.make_optimizer(optim_config(cell.features.optimizer), state.params, trainable, stacked=True)
    step_fn = traced_with(make_train_step(model, tx, trainable=trainable), cell.features)
    if plan is not None:
        step_fn = stacking.stacked_step(step_fn, plan)
        state = jax.device_put(stacking.pack_fn(plan, donate=True)(state), device)
    step = jax.jit(step_fn, donate_argnums=(0,) if cell.features.donate else ())
    count = int(sum(x.size for x in leaves))
    if trainable is None:
        n_train = count
    else:
        n_train = int(sum(x.size for x, t in zip(leaves, jax.tree_util.tree_leaves(trainable)) if t))
    rows, length = rows0.input_ids.shape
    ids = np.asarray(rows0.task_ids)
    flops = step_flops(model, rows, length, task_ids=np.where(ids >= 0, ids, 0).tolist(),
                       backbone_trainable=BACKBONE_TRAINS[cell.config])
    return MtlxSetup(cell, model, state, step, batches, trainable, flops, count, n_train)


def default_cells(sizes: Sequence[str], configs: Sequence[str], seq_lens: Sequence[int],
                  tasks: Sequence[int], batch_size: int, features: Features = Features()) -> List[Cell]:
    return [Cell(c, s, l, t, batch_size, features)
            for s in sizes for l in seq_lens for c in configs for t in tasks]


def grid(spec: Sequence[Tuple[str, str, int, int, int]], features: Features = Features()) -> List[Cell]:
    """Cells from (config, size, seq_len, num_tasks, batch_size) tuples."""
    return [Cell(*row, features=features) for row in spec]


# --------------------------------------------------------------------------- packing workload

def token_task_heads(num_tasks: int) -> tuple:
    from mtlx.models.heads import TaskHead
    return tuple(TaskHead(f"tok{i:02d}", "token_classification", 5) for i in range(num_tasks))


def short_lengths(num: int, row_len: int, seed: int = 0, median: float = 20.0) -> np.ndarray:
    """Token counts of short inputs: log-normal with the given median (sigma 0.5), clipped to
    [4, row_len]. A stand-in for sentence-level tasks (tagging sentences of UD English EWT
    average ~17 words; SST-2's median input is ~13 word pieces)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), 0.5, num)), 4, row_len).astype(np.int64)


def packing_batches(num_examples: int, num_tasks: int, row_len: int, vocab_size: int,
                    seed: int = 0, max_segments: int = 8):
    """The same `num_examples` short token-classification examples as a padded batch (one
    example a row) and a packed batch (mtlx.data.packing: first fit, one task a row).

    Returns (tasks, padded Batch, packed Batch). Token classification because sequence-level
    heads read one pooled vector per row and cannot train packed rows yet (mtlx.data.packing)."""
    from mtlx.data.packing import first_fit, pack
    from mtlx.data.pipeline import BatchLayout, collate
    from mtlx.data.tokenize import TokenizedSplit
    tasks = token_task_heads(num_tasks)
    rng = np.random.default_rng(seed)
    lengths = short_lengths(num_examples, row_len, seed)
    task_of = np.arange(num_examples) % num_tasks
    splits = []
    for t, head in enumerate(tasks):
        lens = lengths[task_of == t]
        starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        n = int(starts[-1])
        splits.append(TokenizedSplit(
            task=head.name, head=head.kind, split="train",
            input_ids=rng.integers(min(1000, vocab_size // 2), vocab_size, n).astype(np.int32),
            type_ids=np.zeros(n, np.int8), row_starts=starts,
            unit_starts=np.arange(len(lens) + 1, dtype=np.int64),
            unit_example=np.arange(len(lens), dtype=np.int32),
            labels=np.full(len(lens), -100, np.int32), label_values=np.zeros(len(lens), np.float32),
            num_examples=len(lens), num_labels=head.num_labels,
            token_labels=rng.integers(0, head.num_labels, n).astype(np.int32)))
    layout = BatchLayout(token_labels=True)
    counters = np.zeros(num_tasks, np.int64)
    rows = []
    for t in task_of:
        rows.append((splits[t], int(counters[t]), int(t), -1))
        counters[t] += 1
    padded = collate(rows, num_examples, row_len, layout)
    placed = first_fit([lengths[i] for i in range(num_examples)], task_of.tolist(),
                       num_examples, row_len, max_segments)
    if len(placed) != num_examples:
        raise ValueError(f"mtlx/bench/workload.py: only {len(placed)} of {num_examples} "
                         f"examples fit the packed rows")
    placements = [(r, o) for _, r, o in placed]
    used = max(r for r, _ in placements) + 1
    segments = [(s, r, t) for s, r, t, _ in rows]
    packed = pack(segments, placements, used, row_len, max_segments, layout).batch
    return tasks, padded, packed


# --------------------------------------------------------------------------- real GLUE lengths

# The embedded sample's binary classification tasks (mtlx/data/sample, real GLUE rows).
GLUE_TASKS = ("cola", "sst2", "mrpc", "qnli", "rte", "wnli")


@dataclasses.dataclass
class GlueWorkload:
    """`per_task` real examples of each GLUE task of the embedded sample, tokenized with the
    bundled bert-base-uncased vocabulary and truncated to `row_len` tokens.

    by_task[t]: (split, row) pairs of task t (the torch baseline's per-task batches);
    stream: (split, row, task id) of every example in one seeded mixed order (mtlx's mixed
    batches, padded or packed)."""
    tasks: tuple
    by_task: list
    stream: list
    row_len: int

    @property
    def num_examples(self) -> int:
        return len(self.stream)

    @property
    def real_tokens(self) -> int:
        return int(sum(s.row_starts[r + 1] - s.row_starts[r] for s, r, _ in self.stream))


def glue_workload(per_task: int, row_len: int = 128, seed: int = 0,
                  task_names: Sequence[str] = GLUE_TASKS) -> GlueWorkload:
    import logging

    from mtlx.data import get_task, load_tokenizer, prepare_tasks, sample_root
    from mtlx.data.readers import resolve_path
    from mtlx.models.heads import TaskHead
    root = sample_root()
    tokenizer = load_tokenizer(root / "vocab" / "bert-base-uncased" / "vocab.txt")
    rng = np.random.default_rng(seed)
    heads, by_task, stream = [], [], []
    quiet = logging.getLogger("mtlx.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # truncation notices (RTE has inputs over 128 tokens)
    try:
        for t, name in enumerate(task_names):
            spec = get_task(name)
            split = next((s for s in (spec.train_split,) + tuple(spec.eval_splits)
                          if _exists(resolve_path, spec, s, root)), None)
            if split is None:
                raise FileNotFoundError(f"mtlx/bench/workload.py: task {name!r} has no split in "
                                        f"the embedded sample {root}")
            data = prepare_tasks([name], tokenizer, split=split, data_root=root,
                                 max_length=row_len)[spec.name]
            if data.head != "classification" or data.num_rows < per_task:
                raise ValueError(f"mtlx/bench/workload.py: task {name!r} ({data.head}, "
                                 f"{data.num_rows} rows in the sample's {split!r} split) cannot "
                                 f"give {per_task} classification examples")
            rows = sorted(rng.permutation(data.num_rows)[:per_task].tolist())
            heads.append(TaskHead(spec.name, "classification", data.num_labels))
            by_task.append([(data, r) for r in rows])
    finally:
        quiet.setLevel(level)
    stream = [(s, r, t) for t, pairs in enumerate(by_task) for s, r in pairs]
    stream = [stream[i] for i in rng.permutation(len(stream))]
    return GlueWorkload(tuple(heads), by_task, stream, row_len)


def _exists(resolve_path, spec, split, root) -> bool:
    try:
        resolve_path(spec, split, root, None)
        return True
    except FileNotFoundError:
        return False


def glue_torch_arrays(w: GlueWorkload, pad: str = "longest") -> list:
    """One batch per task (its `per_task` examples), as arrays for the torch baseline, padded
    to the longest example of the batch (`pad='longest'`: transformers' DataCollatorWithPadding)
    or to the row length (`pad='max_length'`: run_glue.py's default `pad_to_max_length`)."""
    from mtlx.data.pipeline import BatchLayout, collate
    out = []
    for pairs in w.by_task:
        longest = max(int(s.row_starts[r + 1] - s.row_starts[r]) for s, r in pairs)
        length = longest if pad == "longest" else w.row_len
        b = collate([(s, r, 0, -1) for s, r in pairs], len(pairs), length, BatchLayout())
        out.append({"input_ids": np.asarray(b.input_ids), "attention_mask": np.asarray(b.attention_mask),
                    "token_type_ids": np.asarray(b.token_type_ids), "labels": np.asarray(b.labels)})
    return out


def glue_padded_batches(w: GlueWorkload, batch_size: int) -> list:
    """The mixed stream in mtlx Batches of `batch_size` rows of `row_len` (the last one padded
    with empty rows)."""
    from mtlx.data.pipeline import BatchLayout, collate
    return [collate([(s, r, t, -1) for s, r, t in w.stream[i: i + batch_size]], batch_size,
                    w.row_len, BatchLayout())
            for i in range(0, len(w.stream), batch_size)]


def glue_packed_batches(w: GlueWorkload, rows: int, max_segments: int = 16,
                        mix_tasks: bool = False) -> list:
    """The mixed stream packed into PackedBatches of `rows` rows of `row_len` by the training
    loop's placement (mtlx.data.packing.first_fit: one task a row, or any tasks with
    `mix_tasks`; each task's examples in order); what a batch leaves out goes to the next
    one."""
    from mtlx.data.packing import first_fit, pack
    from mtlx.data.pipeline import BatchLayout
    out, rest = [], list(w.stream)
    while rest:
        lengths = [int(s.row_starts[r + 1] - s.row_starts[r]) for s, r, _ in rest]
        placed = first_fit(lengths, [t for _, _, t in rest], rows, w.row_len, max_segments,
                           mix_tasks)
        if not placed:
            raise ValueError(f"mtlx/bench/workload.py: an example of {lengths[0]} tokens fits no "
                             f"row of {w.row_len}")
        taken = {i for i, _, _ in placed}
        out.append(pack([rest[i] for i, _, _ in placed], [(r, o) for _, r, o in placed], rows,
                        w.row_len, max_segments, BatchLayout(), mix_tasks=mix_tasks))
        rest = [x for i, x in enumerate(rest) if i not in taken]
    return out
