"""The training loop: config -> tasks, data, model -> the compiled step -> checkpoints, evals.

    results = train_and_evaluate(load_config("configs/demo.py"), "/tmp/run")

The loop is the only stateful part (iterator, checkpointer, logger, progress bar); everything it
calls is a pure function (mtlx.train.step) or a library object. Writes under `workdir`:
  checkpoints/        orbax checkpoints (last N + best by 'avg'), resumed from by default
  tensorboard/        event files;   metrics.jsonl   every logged scalar
  plots/*.png         loss and metric curves;   eval_results.json   {task: {metric: value}}
`workdir` is a local directory or a URL (gs://bucket/run: mtlx.paths), which a TPU pod
slice's hosts all see.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from mtlx import data as D
from mtlx import paths
from mtlx import metrics as M
from mtlx.models import hf
from mtlx.models.heads import TaskHead
from mtlx.models.multitask import MultiTaskModel, init_params, with_backbone
from mtlx.train import distributed, evaluate as E, optim, sharding, stacking
from mtlx.train.checkpoint import Checkpointer, PreemptionWatch, without_task_names
from mtlx.train.config import ConfigError, convert_value
from mtlx.train.logs import RunLogger
from mtlx.train.spans import SpanReferences
from mtlx.train.step import (count_compilations, create_state, default_weighting_tx,
                             finite_or_raise, init_weighting, make_affinity_probe, unpack_batch,
                             make_eval_step, make_train_step, strategy_from_config)
from mtlx.weighting import affinity as WA


# ----------------------------------------------------------------------------- building blocks

def build_specs(cfg) -> list:
    """TaskSpecs from config.tasks: registered names, or dicts declaring a task from a file."""
    specs = []
    for i, entry in enumerate(cfg.tasks):
        if isinstance(entry, str):
            specs.append(D.get_task(entry))
        else:
            entry = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
            specs.append(D.task_from_config(entry))
    if not specs:
        raise ValueError("config.tasks is empty: name at least one task")
    specs = apply_task_overrides(specs, cfg.get("task_overrides", ()))
    if cfg.get("text_to_text", False):
        specs = [D.text_to_text(sp) if sp.head in ("classification", "regression") else sp
                 for sp in specs]
    return specs


# TaskSpec fields a run may change (config.task_overrides); values are read as config values
# are, to the type the field has.
TASK_OVERRIDES = ("stride", "truncation", "null_answers", "null_score_threshold")


def apply_task_overrides(specs: list, entries) -> list:
    """specs with config.task_overrides applied: entries "task.field=value" (TASK_OVERRIDES)."""
    by_name = {s.name: i for i, s in enumerate(specs)}
    specs = list(specs)
    for entry in entries:
        where = f"config.task_overrides entry {entry!r}"
        head, sep, raw = str(entry).partition("=")
        task, dot, field = head.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"{where}: expected 'task.field=value', e.g. 'ud_pos.stride=32'")
        if task not in by_name:
            raise ValueError(f"{where}: task {task!r} is not in config.tasks {sorted(by_name)}")
        if field not in TASK_OVERRIDES:
            raise ValueError(f"{where}: field {field!r} cannot be overridden; known: {sorted(TASK_OVERRIDES)}")
        current, raw = getattr(specs[by_name[task]], field), raw.strip()
        try:
            value = convert_value(f"task_overrides {entry}", current, raw)
        except ConfigError:
            value = None
        if value is None:
            raise ValueError(f"{where}: {field} must be {type(current).__name__}, got {raw!r}")
        try:
            specs[by_name[task]] = dataclasses.replace(specs[by_name[task]], **{field: value})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return specs


def task_heads(specs) -> tuple:
    return tuple(TaskHead(s.name, s.head, s.num_labels if s.head in
                          ("classification", "multilabel", "token_classification") else 0)
                 for s in specs)


def build_backbone(cfg):
    """(backbone config, pretrained params or None) from config.model."""
    backbone_cfg, params = _backbone(cfg.model)
    return with_execution_switches(backbone_cfg, cfg.model), params


EARLY_STOPPING = {"false": False, "true": True, "never": "never"}


def generation_options(cfg) -> dict:
    """config.generation as keyword arguments of `mtlx.models.multitask.generate`; a bad value
    is an error naming its key."""
    from mtlx.models import t5
    g = cfg.get("generation", None) or {}
    num_beams = g.get("num_beams", 1)
    length_penalty = g.get("length_penalty", 1.0)
    stop = g.get("early_stopping", "false")
    if stop not in EARLY_STOPPING:
        raise ValueError(f"config.generation.early_stopping must be one of "
                         f"{list(EARLY_STOPPING)}, got {stop!r}")
    t5.check_beam_options(num_beams, length_penalty, EARLY_STOPPING[stop],
                          prefix="config.generation.")
    return {"num_beams": int(num_beams), "length_penalty": float(length_penalty),
            "early_stopping": EARLY_STOPPING[stop]}


def text_generation(s) -> tuple:
    """(generate, decode) for evaluating a run's text-to-text tasks, or (None, None) without
    any: decoding (mtlx.models.multitask.generate, jitted; greedy, or beam search per
    config.generation) of up to the batch layout's target length, and the tokenizer's decode
    without special tokens."""
    if not any(spec.head == "seq2seq" for spec in s.run.specs):
        return None, None
    from mtlx.models.multitask import generate as generate_ids
    length = int(s.run.layout.target_length)
    model, tokenizer = s.model, s.run.tokenizer
    options = generation_options(s.cfg)
    generate = jax.jit(lambda params, batch: generate_ids(model, params, batch, length, **options))

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return generate, decode


def with_execution_switches(backbone_cfg, mc):
    """config.model.remat / scan_layers applied to the backbone config (defaults leave it
    untouched); a switch the backbone's config has no field for is an error naming the key."""
    fields = {f.name for f in dataclasses.fields(backbone_cfg)}
    changes = {}
    for key, default in (("remat", "none"), ("scan_layers", False)):
        value = mc.get(key, default)
        if value == default:
            continue
        if key not in fields:
            raise ValueError(f"config.model.{key}={value!r}: this model's config "
                             f"({type(backbone_cfg).__name__}) has no such option")
        changes[key] = value
    return dataclasses.replace(backbone_cfg, **changes) if changes else backbone_cfg


def _backbone(mc):
    overrides = {"dtype": mc.get("dtype", "float32"), "attention_impl": mc.get("attention_impl", None)}
    for key in ("hidden_dropout", "attention_dropout", "dropout_rate"):
        if mc.get(key, None) is not None:
            overrides[key] = mc[key]
    if mc.get("checkpoint", None):
        # a URL (gs://...) is copied to this host's cache first (mtlx.paths.local_copy)
        return hf.load_pretrained(paths.local_copy(mc.checkpoint, what="config.model.checkpoint"),
                                  **overrides)
    family = mc.get("family", "bert")
    arch = mc.config.to_dict() if isinstance(mc.config, ml_collections.ConfigDict) else dict(mc.config)
    if family == "bert":
        from mtlx.models.bert import BertConfig
        return BertConfig(**arch, **{k: v for k, v in overrides.items() if k != "dropout_rate"}), None
    if family == "t5":
        from mtlx.models.t5 import T5Config
        return T5Config(**arch, **{k: v for k, v in overrides.items()
                                   if k not in ("hidden_dropout", "attention_dropout")}), None
    raise ValueError(f"config.model.family: unknown family {family!r}; known: ['bert', 't5']")


def with_extensions(backbone_cfg, cfg, task_names):
    """Attaches PEFT extensions from config.peft.methods (mtlx.peft registry), if any."""
    peft = cfg.get("peft", None)
    methods = [] if peft is None else list(peft.get("methods", ()) or ())
    if not methods:
        return backbone_cfg
    from mtlx.peft import registry
    return registry.attach(backbone_cfg, methods, task_names, key="config.peft.methods")


def trainable_patterns(cfg, backbone_cfg, params=None) -> tuple:
    """config.trainable, or by default: everything (no PEFT) / the PEFT methods' own parameters
    + task heads + the backbone's layer norms (mtlx.peft.registry.trainable_patterns; with
    `params`, the heads' pattern only when the model has heads: a text-to-text T5 has none)."""
    explicit = tuple(cfg.get("trainable", ()) or ())
    if explicit or not getattr(backbone_cfg, "extensions", ()):
        return explicit
    from mtlx.peft import registry
    return tuple(registry.trainable_patterns(backbone_cfg, params=params))


# Backbone config fields that change how the step computes, not which parameters exist: left out
# of the checkpoint signature (and ignored in older checkpoints' signatures), so a run may
# resume with bf16, remat, scan over layers, another attention kernel or other dropout.
EXECUTION_FIELDS = ("dtype", "attention_impl", "remat", "scan_layers", "hidden_dropout",
                    "attention_dropout", "dropout_rate")


def signature_of(backbone_cfg) -> dict:
    """What must match for a checkpoint's parameters to fit this run's model."""
    out = {}
    for f in dataclasses.fields(backbone_cfg):
        if f.name in EXECUTION_FIELDS:
            continue
        v = getattr(backbone_cfg, f.name)
        if f.name == "extensions":
            # the model's task list is compared on its own (by name: tasks may be added or
            # removed); the extensions' copies of it must not make every change a mismatch
            v = [without_task_names(repr(e)) for e in v]
        elif not isinstance(v, (int, float, str, bool, type(None))):
            v = str(getattr(v, "__name__", v))
        out[f.name] = v
    return out


@dataclasses.dataclass
class RunData:
    specs: list
    train: dict
    eval: dict
    tokenizer: Any
    layout: Any
    # {span task: mtlx.train.spans.SpanReferences}: contexts and gold answers of the eval
    # split, so evaluation decodes text answers and scores SQuAD's EM/F1.
    eval_refs: dict = dataclasses.field(default_factory=dict)


def load_data(cfg, backbone_cfg=None, train: bool = True) -> RunData:
    dc = cfg.data
    # task files given as URLs (gs://...) are read from this host's copy (mtlx.paths.local_copy)
    specs = [D.with_local_files(s) for s in build_specs(cfg)]
    tok_path = (paths.local_copy(dc.get("tokenizer", None), what="config.data.tokenizer")
                or (D.sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt"))
    tokenizer = D.load_tokenizer(tok_path)
    if backbone_cfg is not None:
        hf.check_tokenizer_fits(tokenizer, backbone_cfg)
    shard = (jax.process_index(), jax.process_count())
    root = paths.local_copy(dc.get("data_root", None), what="config.data.data_root")
    on_error = dc.get("on_error", "raise")
    train_data, evals, refs = {}, {}, {}
    for spec in specs:
        if train:
            split = D.load_split(spec, spec.train_split, data_root=root, on_error=on_error)
            train_data[spec.name] = D.tokenize_split(split, tokenizer, shard=shard, max_length=dc.max_length)
        if spec.eval_splits:
            ev = D.load_split(spec, spec.eval_splits[0], data_root=root, on_error=on_error)
            evals[spec.name] = D.tokenize_split(ev, tokenizer, max_length=dc.max_length)
            if spec.head == "span":
                refs[spec.name] = SpanReferences.from_split(ev)
    layout = D.BatchLayout.for_heads([(s.head, s.num_labels) for s in specs])
    return RunData(specs, train_data, evals, tokenizer, layout, refs)


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config before the first step."""
    cfg: Any
    model: MultiTaskModel
    names: list
    run: RunData
    iterator: Any            # the training DataIterator (None when built for evaluation only)
    init_batch: Any
    tx: Any
    schedule: Any
    state: Any               # the freshly initialised TrainState
    backbone_cfg: Any
    buckets: Optional[tuple]
    weighting: Any = None    # the task-balancing strategy (None: static config.task_weights)
    trainable: Any = None    # bool pytree of the parameters that train

    def checkpointer(self, workdir: paths.PathLike, **kwargs) -> Checkpointer:
        return Checkpointer(paths.as_path(workdir) / "checkpoints", tasks=self.model.tasks,
                            model_signature=signature_of(self.backbone_cfg),
                            ignore_signature_keys=EXECUTION_FIELDS,
                            run_config=self.cfg.to_dict(), keep_last=self.cfg.checkpoint.keep_last,
                            best_metric=self.cfg.checkpoint.get("best_metric", "avg"),
                            best_mode=self.cfg.checkpoint.get("best_mode", "max"), **kwargs)

    def eval_batches(self, task: str, task_id: int):
        return D.eval_batches(self.run.eval[task], task_id,
                              batch_size=self.cfg.get("eval_batch_size", self.cfg.batch_size),
                              layout=self.run.layout, buckets=self.buckets)


def make_packed_train_iterator(cfg, run, mixture, backbone_cfg, buckets):
    """config.data.packing: training rows of the longest bucket (or max_length), each holding up
    to config.data.packing_max_segments examples of one task, or of any tasks with
    config.data.packing_mix_tasks (mtlx.data.packing); evaluation stays one example a row."""
    from mtlx.data.packing import make_packed_iterator
    if getattr(backbone_cfg, "model_type", None) not in ("bert", "roberta", "t5"):
        raise ValueError(f"config.data.packing=True needs a BERT, RoBERTa or T5 encoder, got "
                         f"{getattr(backbone_cfg, 'model_type', type(backbone_cfg).__name__)!r}")
    row_len = int(buckets[-1]) if buckets else int(cfg.data.max_length)
    offset = backbone_cfg.pad_token_id + 1 if backbone_cfg.model_type == "roberta" else 0
    mix = bool(cfg.data.get("packing_mix_tasks", False))
    per_row = [e.method for e in getattr(backbone_cfg, "extensions", ())
               if not e.routes_per_token]
    if mix and per_row:
        raise ValueError(f"config.data.packing_mix_tasks=True: {per_row} tuning gives each row "
                         f"its task's virtual tokens and cannot serve rows that mix tasks; set "
                         f"config.data.packing_mix_tasks=False")
    try:   # the iterator checks the tasks' heads and max_segments; its errors get the key
        return make_packed_iterator(run.train, mixture, batch_size=cfg.batch_size, seed=cfg.seed,
                                    row_len=row_len,
                                    max_segments=int(cfg.data.get("packing_max_segments", 8)),
                                    position_offset=offset, mix_tasks=mix)
    except ValueError as e:
        raise ValueError(f"config.data.packing=True: {e}") from None


def setup(cfg, train: bool = True) -> Setup:
    """Data, model, optimizer and initial state from a config (no device placement yet)."""
    backbone_cfg, pretrained = build_backbone(cfg)
    if cfg.get("text_to_text", False) and getattr(backbone_cfg, "model_type", "") != "t5":
        raise ValueError(f"config.text_to_text=True needs a T5 backbone (an encoder-decoder that "
                         f"generates text), got {type(backbone_cfg).__name__}")
    run = load_data(cfg, backbone_cfg, train=train)
    heads = task_heads(run.specs)
    names = [h.name for h in heads]
    backbone_cfg = with_extensions(backbone_cfg, cfg, names)
    model = MultiTaskModel(backbone_cfg, heads, head_dropout=cfg.model.get("head_dropout", 0.1))
    buckets = tuple(cfg.data.buckets) if cfg.data.get("buckets", None) else None
    if buckets is None and jax.process_count() > 1:
        # one shape on every process: the tokenization limit, not a shard's longest row
        limit = cfg.data.get("max_length", None)
        buckets = (int(max(limit or spec.max_length for spec in run.specs)),)
    it = None
    if train:
        mc = cfg.mixture
        kwargs = mc.get("kwargs", None)
        kwargs = kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs or {})
        mixture = D.mixture_for(run.train, D.make_strategy(mc.strategy, **kwargs),
                                mixed=mc.get("mixed", True), tasks=names)
        if cfg.data.get("packing", False):
            it = make_packed_train_iterator(cfg, run, mixture, backbone_cfg, buckets)
        elif cfg.data.get("packing_mix_tasks", False):
            raise ValueError("config.data.packing_mix_tasks=True needs config.data.packing=True")
        else:
            it = D.make_iterator(run.train, mixture, batch_size=cfg.batch_size, seed=cfg.seed,
                                 buckets=buckets)
        init_batch = it.batch_at(0)
    else:
        first = next(iter(run.eval))
        init_batch = next(iter(D.eval_batches(run.eval[first], names.index(first), batch_size=cfg.batch_size,
                                              layout=run.layout, buckets=buckets))).batch
    # Packed batches: the rows alone shape the parameters.
    params = init_params(model, jax.random.key(cfg.seed), unpack_batch(init_batch)[0])
    if pretrained is not None:
        params = with_backbone(params, pretrained)
    trainable = optim.trainable_mask(params, trainable_patterns(cfg, backbone_cfg, params))
    params = optim.cast_frozen_kernels(params, trainable, cfg.model.get("frozen_dtype", None),
                                       backbone_cfg.dtype)
    schedule = optim.make_schedule(cfg.optim)
    tx = optim.make_optimizer(cfg.optim, params, trainable)
    wc = cfg.get("weighting", None)
    strategy = strategy_from_config(wc, cfg.get("task_weights", None))
    state = create_state(
        params, tx, jax.random.key(cfg.seed + 1),
        None if strategy is None else init_weighting(strategy, model, params, trainable),
        None if wc is None else default_weighting_tx(wc.learning_rate))
    return Setup(cfg, model, names, run, it, init_batch, tx, schedule, state, backbone_cfg, buckets,
                 strategy, trainable)


def restore_state(s: Setup, workdir: paths.PathLike, which: str = "latest"):
    """The train state saved in `workdir` ('latest', 'best' or a step number).

    'best' ranks by the training run's own `checkpoint.best_metric` / `best_mode` (saved with
    its checkpoints; this command's config may differ, and a note says so), among the steps
    evaluated with this run's tasks."""
    which = str(which)
    if which not in ("latest", "best") and not which.isdigit():
        raise ValueError(f"checkpoint must be 'latest', 'best' or a step number, got {which!r}")
    where = paths.as_path(workdir) / "checkpoints"
    with s.checkpointer(workdir, read_only=True) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {where}")
        if which == "latest":
            return ckpt.restore_latest(s.state)
        if which.isdigit():
            if int(which) not in steps:
                raise FileNotFoundError(f"no checkpoint of step {which} in {where}; its steps: {steps}")
            return ckpt.restore(int(which), s.state)
        ours = s.cfg.checkpoint
        metric, mode = ours.get("best_metric", "avg"), ours.get("best_mode", "max")
        saved = (ckpt.run_config(steps[-1]) or {}).get("checkpoint", {})
        run_metric, run_mode = saved.get("best_metric", metric), saved.get("best_mode", mode)
        if (run_metric, run_mode) != (metric, mode):
            print(f"'best' by the training run's checkpoint.best_metric={run_metric!r} "
                  f"(best_mode={run_mode!r}), not this command's {metric!r} ({mode!r})")
        restored = ckpt.restore_best(s.state, metric=run_metric, mode=run_mode)
        if restored is None:
            raise FileNotFoundError(
                f"no checkpoint in {where} has a finite {run_metric!r} taken with this run's "
                f"tasks (steps {steps}); pass 'latest' or a step number")
        return restored


def print_results(results: dict, step: int) -> None:
    if results:
        print(M.format_metrics_table(results, title=f"per-task evaluation at step {step}"))
        undefined = E.undefined_scores(results)
        print(f"average of task scores: {E.summary_score(results):.4f}"
              + (f" (undefined: {', '.join(undefined)})" if undefined else ""))


# ----------------------------------------------------------------------------- the run

def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: paths.PathLike,
                       progress: bool = True, on_step=None, return_state: bool = False):
    """Runs the config in `workdir`; returns {task: {metric: value}} (and the final train state
    if `return_state`). `on_step(step)` is called after each step (tests, profilers)."""
    workdir = paths.as_path(workdir)
    distributed.initialize(cfg)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)

    s = setup(cfg)
    choice = [tk.name for tk in s.model.tasks if tk.kind == "multiple_choice"]
    if cfg.optim.get("accum_steps", 1) > 1 and choice:
        # A question's candidates are one softmax, and the step computes each microbatch's
        # on its own: the batches would have to keep every question inside a microbatch,
        # which the data pipeline does not (it fills rows without regard to their boundaries).
        raise ValueError(f"config.optim.accum_steps={cfg.optim.accum_steps} with multiple-choice "
                         f"task(s) {choice} is not supported: a question's candidate rows could "
                         f"be split across microbatches; use config.optim.accum_steps=1")
    model, names, run, it, tx, state = s.model, s.names, s.run, s.iterator, s.tx, s.state
    init_batch = s.init_batch
    mesh = sharding.make_mesh(cfg.get("mesh", None) and cfg.mesh.to_dict())
    abstract_state = jax.eval_shape(lambda s: s, state)
    ckpt = s.checkpointer(workdir)
    # restored straight into the step's shardings: each process reads its shards (and on
    # several processes nothing else would do: restored arrays cannot cross hosts)
    restored = ckpt.restore_latest(state, allow_new_tasks=cfg.get("allow_new_tasks", False),
                                   shardings=sharding.tree_shardings(mesh, abstract_state))
    if restored is not None:
        state = restored.state
        it.restore(restored.data_state)
        if is_main:
            print(f"resumed from step {restored.step} in {workdir / 'checkpoints'}")

    # Many tasks' small leaves travel stacked through the step's jit boundary (host dispatch
    # per array) and are updated stacked (a program per group, not per leaf; the state keeps
    # its per-leaf form): mtlx.train.stacking. The loop unstacks for evaluation and checkpoints.
    start_step = int(jax.device_get(state.step))
    plan = None
    if stacking.wants_stacking(cfg.get("stack_state", "auto"), abstract_state):
        tree_sh = sharding.tree_shardings(mesh, abstract_state)
        plan = stacking.StackPlan.for_tree(abstract_state, tree_sh)
        tx = optim.make_optimizer(cfg.optim, abstract_state.params, s.trainable, stacked=True)
    wc = cfg.get("weighting", None)
    step_fn = make_train_step(model, tx, task_weights=cfg.get("task_weights", None),
                              accum_steps=cfg.optim.get("accum_steps", 1), schedule=s.schedule,
                              weighting=s.weighting, trainable=s.trainable,
                              **({} if wc is None else dict(
                                  grads_wrt=wc.grads_wrt, representation=wc.representation,
                                  sequential=wc.sequential,
                                  weighting_tx=default_weighting_tx(wc.learning_rate))))
    train_step, state_sh = sharding.jit_train_step(step_fn, mesh, abstract_state, init_batch,
                                                   donate=True, stack=plan)
    if plan is None:
        state = jax.device_put(state, state_sh)
        view = lambda st: st  # noqa: E731
    else:
        # donated, as the unstacked state is to the first step: no second copy of the state
        state = stacking.put(state, plan, tree_sh, donate=True)
        view = stacking.unpack_fn(plan)
    eval_step = jax.jit(make_eval_step(model))
    multi = jax.process_count() > 1

    def place(local_batch):
        if multi:
            return distributed.global_batch(mesh, local_batch, cfg.batch_size)
        return jax.device_put(local_batch, sharding.batch_sharding(mesh, local_batch))

    def place_eval(batch):
        if multi:
            rows = np.arange(batch.batch_size)[distributed.process_slice(batch.batch_size)]
            return distributed.global_batch(mesh, batch.select(rows), batch.batch_size)
        return jax.device_put(batch, sharding.batch_sharding(mesh, batch))

    generate, decode = text_generation(s)

    def run_eval(params):
        return E.evaluate_tasks(eval_step, params, run.specs, run.eval, s.eval_batches, place_eval,
                                references=run.eval_refs,
                                max_batches=cfg.get("eval_max_batches", None),
                                generate=generate, decode=decode)

    logger = RunLogger(workdir, enabled=is_main, resume_step=start_step)
    preempted = PreemptionWatch(multi)
    total = int(cfg.optim.num_train_steps)
    start = start_step
    probe = report = None  # task-affinity report (mtlx.weighting.affinity)
    if wc is not None and wc.report.enabled:
        probe = jax.jit(make_affinity_probe(
            model, lookahead_lr=wc.report.lookahead_lr or float(cfg.optim.learning_rate),
            trainable=s.trainable, sequential=wc.sequential))
        report = WA.AffinityReport(names, workdir / "affinity", num_groups=tuple(wc.report.num_groups),
                                   max_exhaustive=wc.report.max_exhaustive, resume_step=start,
                                   enabled=is_main)
    bar = None
    if progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def place_counted(local_batch):
        """(the placed batch, the examples it holds): a packed batch holds several a row
        (its real segments; on several processes this process's count x process count)."""
        segments = getattr(local_batch, "segments", None)
        if segments is None:
            return place(local_batch), cfg.batch_size
        return place(local_batch), int(np.asarray(segments.mask).sum()) * jax.process_count()

    prefetched = D.prefetch(it, size=2, transform=place_counted)
    pending = None  # (step, metrics) checked one step late, so dispatch stays asynchronous
    results, last_eval_step = {}, None
    t0, examples, steps = time.perf_counter(), 0, 0

    def check(p):
        if p is not None:
            finite_or_raise(jax.device_get(p[1]), p[0], names)

    try:
        for step in range(start, total):
            batch, num_examples = next(prefetched)
            state, metrics = train_step(state, batch)
            check(pending)
            pending = (step, metrics)
            examples += num_examples
            steps += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == total:
                check(pending)
                m = jax.device_get(metrics)
                dt = time.perf_counter() - t0
                scalars = {"train/loss": m["loss"], "train/grad_norm": m["grad_norm"],
                           "train/learning_rate": m.get("learning_rate", np.nan),
                           "perf/examples_per_s": examples / dt, "perf/steps_per_s": steps / dt}
                for i, n in enumerate(names):
                    if m["task_count"][i] > 0:
                        scalars[f"train/loss/{n}"] = m["task_loss"][i]
                logger.write(done, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}", ex_s=f"{examples / dt:.1f}")
                t0, examples, steps = time.perf_counter(), 0, 0
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(done)
            stop = preempted.should_stop(done)  # the same step on every process
            # Preempted: save at once (a grace period is ~30 s on spot VMs and TPUs); the run
            # that resumes evaluates at its next evaluation step (this step goes unranked).
            eval_now = (done % cfg.eval_every == 0 or done == total) and not stop
            save_now = done % cfg.checkpoint.every == 0 or done == total or stop
            if eval_now:
                check(pending)
                results = run_eval(view(state).params)
                last_eval_step = done
                scalars = {f"eval/{t}/{k}": v for t, r in results.items() for k, v in r.items()}
                scalars["eval/avg"] = E.summary_score(results)
                if wc is not None:  # the last step's task weights, the affinity probe
                    m = jax.device_get(metrics)
                    scalars.update(WA.weight_scalars(m["task_weight"], m["task_count"], names))
                    if probe is not None:
                        scalars.update(report.add(done, jax.device_get(probe(view(state).params, batch))))
                logger.write(done, scalars, kind="eval")
            if save_now:
                check(pending)
                ranking = None
                if eval_now:
                    best_key = cfg.checkpoint.get("best_metric", "avg")
                    ranking = E.selection_metrics(results, best_key)
                    if ranking is None and is_main:
                        why = ", ".join(E.undefined_scores(results)) if best_key == "avg" else ""
                        print(f"\nstep {done}: config.checkpoint.best_metric {best_key!r} is "
                              f"not finite ({why or best_key} = nan; a correlation of constant "
                              f"predictions is undefined): this checkpoint is not ranked for "
                              f"'best'")
                ckpt.save(done, view(state), data_state=prefetched.state(), metrics=ranking)
            if stop:
                if is_main:
                    print(f"\npreempted (signal {preempted.signum}): saved step {done}, exiting")
                break
        check(pending)
    except BaseException:
        try:
            logger.close()  # what was logged reaches the workdir; the staging directory goes
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to raise
            print(f"mtlx: closing the run's logs after an error failed too: {e!r}")
        raise
    finally:
        try:
            prefetched.close()
            if bar is not None:
                bar.close()
            ckpt.close()  # may raise (a failed last save): the signal handlers still go back
        finally:
            preempted.close()

    state = view(state)
    final_step = int(jax.device_get(state.step))
    if last_eval_step != final_step and final_step >= total:
        results = run_eval(state.params)
    if is_main:
        num_leaves = len(jax.tree_util.tree_leaves(state))
        logger.write(final_step, {"compile/train_step_executables": count_compilations(train_step),
                                  "compile/train_step_state_leaves": num_leaves,
                                  "compile/train_step_state_arrays": (plan.num_arrays if plan is not None
                                                                      else num_leaves)},
                     kind="info")
        logger.plot()
        logger.close()
        paths.write_atomic(workdir / "eval_results.json", json.dumps(results, indent=2, sort_keys=True))
        if report is not None:
            report.write()
        print_results(results, final_step)
        print(f"train step compiled {count_compilations(train_step)} time(s)")
    return (results, state) if return_state else results
