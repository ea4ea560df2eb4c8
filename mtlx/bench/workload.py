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
    prng: str = "threefry2x32"          # dropout's random bits: JAX's PRNG implementation
    scan_layers: bool = False         # BertConfig.scan_layers: the layers as one lax.scan

    def __post_init__(self):
        from mtlx.models.attention import IMPLEMENTATIONS
        from mtlx.models.remat import check_policy
        if self.dtype not in DTYPES:
            raise ValueError(f"mtlx/bench/workload.py: Features.dtype must be one of {DTYPES}, "
                             f"got {self.dtype!r}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"mtlx/bench/workload.py: Features.attention must be one of "
                             f"{IMPLEMENTATIONS}, got {self.attention!r}")
        check_policy(self.remat, "Features.remat")
        if self.prng not in PRNGS:
            raise ValueError(f"mtlx/bench/workload.py: Features.prng must be one of {PRNGS}, "
                             f"got {self.prng!r}")
        if self.attention == "cudnn" and self.attention_dropout > 0:
            # cuDNN's fused kernel cannot drop attention probabilities (mtlx.models.bert).
            raise ValueError(f"mtlx/bench/workload.py: Features.attention='cudnn' needs "
                             f"attention_dropout=0.0, got {self.attention_dropout}")

    def describe(self) -> str:
        return (f"{self.dtype}, attention={self.attention or 'default'}, remat={self.remat}, "
                f"donate={'on' if self.donate else 'off'}, attention_dropout={self.attention_dropout}, "
                f"prng={self.prng}, scan_layers={'on' if self.scan_layers else 'off'}")


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


def backbone_config(cell: Cell):
    """The BertConfig of a cell, extensions of its configuration attached."""
    import jax.numpy as jnp
    from mtlx.models.bert import BertConfig
    from mtlx.peft import registry
    f = cell.features
    cfg = BertConfig(**SIZES[cell.size], hidden_dropout=HIDDEN_DROPOUT,
                     attention_dropout=f.attention_dropout, dtype=jnp.dtype(f.dtype),
                     param_dtype=jnp.float32, attention_impl=f.attention, remat=f.remat,
                     scan_layers=f.scan_layers)
    methods = CONFIGS[cell.config]
    if methods:
        cfg = registry.attach(cfg, methods, [t.name for t in task_heads(cell.num_tasks)])
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


def optim_config() -> OptimConfig:
    return OptimConfig(optimizer="adamw", learning_rate=LEARNING_RATE, warmup_steps=0,
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


def with_prng(step_fn, prng: str):
    """The step traced with `prng` as JAX's default PRNG (the train state's raw key data is
    wrapped with the default implementation inside mtlx.train.step)."""
    if prng == "threefry2x32":
        return step_fn

    def step(state, batch):
        import jax
        with jax.default_prng_impl(prng):
            return step_fn(state, batch)
    return step


def build_mtlx(cell: Cell, seed: int = 0, num_batches: int = 4, device=None) -> MtlxSetup:
    """Model, initial train state, jitted step (not yet compiled) and batches of a cell."""
    import jax
    from mtlx.bench.flops import step_flops
    from mtlx.models.multitask import MultiTaskModel, init_params
    from mtlx.peft import registry
    from mtlx.train import optim
    from mtlx.train.step import create_state, make_train_step

    device = device or jax.devices()[0]
    cfg = backbone_config(cell)
    model = MultiTaskModel(cfg, task_heads(cell.num_tasks), head_dropout=HEAD_DROPOUT)
    batches = [jax.device_put(b, device) for b in mixed_batches(cell, num_batches, seed)]
    with jax.default_device(device):
        # Eager, on a 1 x 8 slice: parameter shapes do not depend on the batch, and jitting the
        # init compiles one program per parameter leaf (slow with many tasks' adapters).
        probe = jax.tree_util.tree_map(lambda x: x[:1, :8] if x.ndim == 2 else x[:1], batches[0])
        params = init_params(model, jax.random.key(seed), probe)
        trainable = None
        if not BACKBONE_TRAINS[cell.config]:
            trainable = optim.trainable_mask(params, registry.trainable_patterns(cfg))
        tx = optim.make_optimizer(optim_config(), params, trainable)
        # Not jitted: XLA would merge equal outputs (Adam's zero moments) into one buffer, and a
        # state holding one buffer twice cannot be donated twice.
        state = create_state(params, tx, jax.random.key(seed + 1, impl=cell.features.prng))
    # Committed to the device like the step's outputs: a first call with uncommitted arrays
    # would compile an executable that the second call (committed state) cannot reuse.
    state = jax.device_put(state, device)
    del params
    # `trainable` as the training loop passes it: frozen backbone weights are not differentiated.
    step = jax.jit(with_prng(make_train_step(model, tx, trainable=trainable), cell.features.prng),
                   donate_argnums=(0,) if cell.features.donate else ())
    leaves = jax.tree_util.tree_leaves(state.params)
    count = int(sum(x.size for x in leaves))
    if trainable is None:
        n_train = count
    else:
        n_train = int(sum(x.size for x, t in zip(leaves, jax.tree_util.tree_leaves(trainable)) if t))
    flops = step_flops(model, cell.batch_size, cell.seq_len,
                       task_ids=step_task_ids(0, cell.batch_size, cell.num_tasks),
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
    placements = first_fit([lengths[i] for i in range(num_examples)], task_of.tolist(),
                           num_examples, row_len, max_segments)
    if len(placements) != num_examples:
        raise ValueError(f"mtlx/bench/workload.py: only {len(placements)} of {num_examples} "
                         f"examples fit the packed rows")
    used = max(r for r, _ in placements) + 1
    segments = [(s, r, t) for s, r, t, _ in rows]
    packed = pack(segments, placements, used, row_len, max_segments, layout).batch
    return tasks, padded, packed
