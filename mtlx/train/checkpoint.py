"""Asynchronous, atomic checkpoints of a multi-task run, and preemption handling.

    ckpt = Checkpointer(workdir / "checkpoints", tasks=model.tasks,
                        model_signature=backbone_config.to_dict(), run_config=config,
                        keep_last=3, best_metric="glue_avg", best_mode="max")
    restored = ckpt.restore_latest(state)             # None on a fresh workdir
    if restored is not None:
        state, data_state = restored.state, restored.data_state
    preempted = install_preemption_handler()
    for step in ...:
        state, metrics = train_step(state, batch)      # may donate the old state
        ckpt.save(step, state, data_state=it.get_state(), metrics=eval_metrics_or_None)
        if preempted.is_set():
            ckpt.save(step, state, data_state=it.get_state())  # no-op if already saved
            break
    ckpt.close()                                       # waits for the last async write

Built on orbax-checkpoint's ``CheckpointManager`` (tested with orbax-checkpoint 0.12.8). One
checkpoint is one step directory holding four items:

  state        the train state, an arbitrary pytree of arrays (params, optimizer state, step,
               RNG key -- typed ``jax.random.key`` or raw uint32 data --, weighting state)
  data_state   the data iterator's state (JSON)
  run_config   the run's config (JSON; a ConfigDict is stored as ``to_dict()``)
  model        ``{'tasks': [...], 'signature': {...}}``: the ordered task set (name, head kind,
               num_labels) and the model signature (e.g. the backbone config), both checked on
               restore.

Guarantees and how they are obtained (each one is tested in tests/test_checkpoint.py):

* Atomic saves. orbax writes a step into ``<step>.orbax-checkpoint-tmp*`` and renames it to
  ``<step>`` only after every item (and ``commit_success.txt``) is written; step directories
  with the temporary suffix are never listed as checkpoints, so a save interrupted at any point
  (SIGKILL, power loss, full disk) is never picked on restore. Leftover temporary directories
  are removed when the next writing ``Checkpointer`` opens the directory (``read_only=True``
  readers, e.g. an evaluator beside a live run, leave them alone). In a bucket
  (``gs://bucket/run/checkpoints``: object stores have no rename) orbax writes ``<step>`` in
  place and a step counts only once its ``commit_success.txt`` exists (orbax's
  ``CommitFileTemporaryPath``, its default for gs://); tests/test_remote_paths.py runs this
  against a local GCS emulator.
* Asynchronous saves without races. ``save`` blocks only while device arrays are copied to host
  memory (orbax's default ``TransferPriority.SYNCHRONOUS`` device-to-host transfer) and host
  numpy leaves are deep-copied (``NumpyHandler(deepcopy_host_arrays=True)``, the default), then
  returns while a background thread writes. So the caller may mutate, delete or donate the
  state right after ``save`` returns (tested by freeing every buffer). Each ``save`` first waits
  for the previous one, so save every k steps where one write takes up to k steps;
  ``wait_until_finished()``/``close()`` waits for the last (call it before exiting: a process
  that exits mid-write leaves only an ignored temporary directory).
* Retention: the last ``keep_last`` checkpoints AND the ``keep_best`` best by ``best_metric``
  (orbax ``AnyPreservationPolicy(LatestN, BestN)``: a step is kept if either policy keeps it).
  Checkpoints saved without metrics count only for the keep-last rule. Old steps are deleted
  only after the new step is committed.
* Full disk (or any write error): ``CheckpointSaveError`` naming the step, the directory and the
  cause (ENOSPC is recognised anywhere in the exception chain); the previous checkpoint is left
  intact because nothing is deleted until a save commits. An asynchronous write fails in the
  background, so the error is raised by the next ``save``, ``wait_until_finished`` or ``close``.
* Compatibility on restore: a checkpoint written for another model signature, or for another
  task set, raises ``CheckpointMismatchError`` listing every difference. ``allow_new_tasks=True``
  restores the old parameters and takes the new tasks' parameters from the fresh target: every
  state leaf with a path component equal to a new task's name (``params['heads'][name]``, a
  task's adapter, and the optimizer moments mirroring them) comes from the target, merged by
  path. Removing tasks is refused even with ``allow_new_tasks`` (their trained parameters would
  be silently dropped); ``allow_removed_tasks=True`` drops them explicitly. When the task set
  changes under one of these flags, state leaves outside any task subtree whose shape changed
  (per-task vectors of a weighting strategy, ``[T_old] -> [T_new]``: positions cannot be
  mapped) are re-initialised from the target too; every leaf taken from the target is listed
  in ``Restored.fresh_paths`` and the re-shaped ones are logged as a warning. Changing a task's
  head (kind or num_labels) or the relative order of the tasks (task ids index per-task state)
  is always an error.

Preemption: ``install_preemption_handler()`` turns SIGTERM into a flag that the loop polls
after each step (a signal handler must not run a save: it interrupts the main thread at an
arbitrary bytecode, possibly inside a save). It is per process: in a multi-process run every
process must stop (and save) at the same step, which ``PreemptionWatch`` (what the loop uses)
arranges through JAX's preemption sync manager.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import signal
import threading
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtlx import paths

log = logging.getLogger(__name__)

STATE, DATA_STATE, RUN_CONFIG, MODEL = "state", "data_state", "run_config", "model"
TASKS_KEY = "_tasks"  # saved with a step's metrics: the tasks they were taken with
_ITEMS = (STATE, DATA_STATE, RUN_CONFIG, MODEL)
_FORMAT = 1  # version of the 'model' item's layout


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previously committed checkpoint is intact."""

    def __init__(self, message: str, *, step: int, directory: str, disk_full: bool):
        super().__init__(message)
        self.step, self.directory, self.disk_full = step, directory, disk_full


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a different model or task set than the current run."""


# ----------------------------------------------------------------------------- JSON items

def _to_json(value: Any, where: str) -> Any:
    """`value` as plain JSON types; raises TypeError naming the offending key path."""
    if hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, Mapping):
        value = value.to_dict()  # ml_collections.ConfigDict, transformers PretrainedConfig
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be str")
            out[k] = _to_json(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{where}: a {type(value).__name__} ({value!r:.80}) is not JSON-serialisable; "
                    f"convert it to a Python scalar/list/dict first (arrays belong in the state)")


def _task_record(task: Any, i: int) -> dict:
    if isinstance(task, str):
        return {"name": task}
    if dataclasses.is_dataclass(task) and not isinstance(task, type):
        rec = dataclasses.asdict(task)
    elif isinstance(task, Mapping):
        rec = dict(task)
    else:
        raise TypeError(f"tasks[{i}]: expected a TaskHead, a dict or a task name, got {type(task).__name__}")
    if not isinstance(rec.get("name"), str) or not rec["name"]:
        raise ValueError(f"tasks[{i}]: a task needs a non-empty str 'name', got {rec.get('name')!r}")
    return _to_json(rec, f"tasks[{i}]")


def normalize_tasks(tasks: Sequence[Any]) -> list[dict]:
    """The ordered task set as JSON records (``TaskHead`` -> ``{'name','kind','num_labels'}``)."""
    records = [_task_record(t, i) for i, t in enumerate(tasks)]
    names = [r["name"] for r in records]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tasks: names must be unique; repeated: {dupes}")
    return records


# ----------------------------------------------------------------------------- compatibility

def _flatten_json(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(_flatten_json(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1] or "<root>": tree}


@dataclasses.dataclass(frozen=True)
class ModelDiff:
    """Differences between a checkpoint's model spec and the current run's."""
    signature: tuple = ()   # (key, checkpoint value, current value); value _MISSING if absent
    added: tuple = ()       # task names in the run, not in the checkpoint
    removed: tuple = ()     # task names in the checkpoint, not in the run
    changed: tuple = ()     # (name, field, checkpoint value, current value)
    reordered: tuple = ()   # (checkpoint order, current order) of the common tasks, if it differs

    def __bool__(self):
        return bool(self.signature or self.added or self.removed or self.changed or self.reordered)

    def describe(self) -> list[str]:
        lines = [f"model signature: {k}: checkpoint {a if a is not _MISSING else '<absent>'}, "
                 f"this run {b if b is not _MISSING else '<absent>'}" for k, a, b in self.signature]
        if self.added:
            lines.append(f"tasks added (in this run, not in the checkpoint): {list(self.added)} "
                         f"-> allow_new_tasks=True restores the rest and initialises these fresh")
        if self.removed:
            lines.append(f"tasks removed (in the checkpoint, not in this run): {list(self.removed)} "
                         f"-> allow_removed_tasks=True drops their parameters")
        lines += [f"task {n!r} changed head: {f} checkpoint {a}, this run {b}"
                  for n, f, a, b in self.changed]
        if self.reordered:
            lines.append(f"task order changed (task ids index per-task state): checkpoint "
                         f"{list(self.reordered[0])}, this run {list(self.reordered[1])}; "
                         f"keep the old order and append new tasks")
        return lines


class _Missing:
    def __repr__(self):
        return "<absent>"


_MISSING = _Missing()


_TASK_NAMES = re.compile(r"task_names=\((?:'[^']*'(?:, )?,?)*\)(?:, )?")


def without_task_names(text: str) -> str:
    """A signature value (e.g. a PEFT extension's repr) without its copy of the model's task
    list (``task_names=('a', 'b'), ``): tasks are compared by name on their own, so adding or
    removing one must not change the signature."""
    return _TASK_NAMES.sub("", text)


def compare_model_spec(saved: Mapping, current: Mapping, ignore: Sequence[str] = ()) -> ModelDiff:
    """Pure comparison of two ``{'tasks': [...], 'signature': {...}}`` records; signature keys
    in `ignore` (top-level names) are left out on both sides, and so are copies of the task
    list inside signature values (`without_task_names`: older checkpoints kept them)."""
    def sig(record):
        flat = _flatten_json(record.get("signature") or {})
        def plain(v):
            if isinstance(v, str):
                return without_task_names(v)
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {k: plain(v) for k, v in flat.items() if k.split(".", 1)[0] not in set(ignore)}
    a, b = sig(saved), sig(current)
    signature = tuple((k, a.get(k, _MISSING), b.get(k, _MISSING)) for k in sorted(a.keys() | b.keys())
                      if a.get(k, _MISSING) != b.get(k, _MISSING))
    old = {t["name"]: t for t in saved["tasks"]}
    new = {t["name"]: t for t in current["tasks"]}
    added = tuple(n for n in new if n not in old)
    removed = tuple(n for n in old if n not in new)
    changed = tuple((n, f, old[n].get(f, _MISSING), new[n].get(f, _MISSING))
                    for n in new if n in old
                    for f in sorted(old[n].keys() | new[n].keys())
                    if old[n].get(f, _MISSING) != new[n].get(f, _MISSING))
    old_common = [n for n in old if n in new]
    new_common = [n for n in new if n in old]
    reordered = (tuple(old_common), tuple(new_common)) if old_common != new_common else ()
    return ModelDiff(signature, added, removed, changed, reordered)


# ----------------------------------------------------------------------------- state trees

def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _leaf_name(path) -> str:
    """orbax's parameter name of a leaf: key path components joined by '.'."""
    return ".".join(_key_name(k) for k in path)


def _is_key_array(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _abstract(x, sharding=None):
    """A restore target leaf: arrays become ShapeDtypeStructs with ``sharding`` (default:
    their own)."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding)
    return x  # numpy array, Python scalar: orbax restores as that type


def _check_leaves(state: Any) -> None:
    """Fail in the caller's thread (not later in the background writer) on unsavable leaves."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            continue
        if isinstance(leaf, (int, float)):  # bool is an int
            continue
        raise TypeError(f"state leaf {_leaf_name(path) or '<root>'}: a {type(leaf).__name__} "
                        f"cannot be checkpointed; the state holds arrays and numbers only "
                        f"(JSON-like values go to data_state)")


def _stored_shape(x) -> tuple:
    if _is_key_array(x):  # typed keys are stored as their uint32 key data
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(np.shape(x))


# ----------------------------------------------------------------------------- errors

def _exception_chain(e: BaseException):
    seen, todo = set(), [e]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__] + list(getattr(e, "exceptions", ()))


def _is_disk_full(e: BaseException) -> bool:
    # tensorstore reports write errors as ValueError text, Python I/O as OSError(ENOSPC).
    return any((isinstance(c, OSError) and c.errno == errno.ENOSPC)
               or "No space left on device" in str(c) for c in _exception_chain(e))


# ----------------------------------------------------------------------------- checkpointer

@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: Any
    run_config: Any
    tasks: list          # the checkpoint's task records
    model_signature: dict
    fresh_paths: tuple = ()  # state leaves taken from the target (new tasks, re-shaped state)


class Checkpointer:
    """Saves and restores one run's checkpoints in ``directory`` (see the module docstring).

    Args:
      directory: the run's checkpoint directory (created if absent).
      tasks: the run's ordered tasks: ``TaskHead``s, ``{'name', 'kind', 'num_labels'}`` dicts or
        names. Stored with every checkpoint and compared on restore.
      model_signature: what makes parameters of two runs interchangeable (e.g. the backbone
        config dict, adapter settings). JSON; compared key by key on restore.
      ignore_signature_keys: top-level signature keys not compared on restore (on either side:
        also when an older checkpoint's signature has them), e.g. fields that change how the
        step computes but not which parameters exist.
      run_config: the run's config (dict or ConfigDict), stored for reference, not compared.
      keep_last: how many of the most recent checkpoints to keep.
      best_metric: key of ``save(metrics=...)`` that ranks checkpoints; None keeps only the last.
      best_mode: 'max' or 'min': which end of ``best_metric`` is best.
      keep_best: how many best checkpoints to keep besides the last ``keep_last``.
      async_save: write in a background thread (default) or block until written.
      read_only: only restore (evaluation, serving, inspecting a live run): never writes and
        never removes another process's in-progress temporary directories.
    """

    def __init__(self, directory: str | os.PathLike, *, tasks: Sequence[Any],
                 model_signature: Mapping, run_config: Any = None, keep_last: int = 3,
                 best_metric: Optional[str] = None, best_mode: str = "max", keep_best: int = 1,
                 async_save: bool = True, read_only: bool = False,
                 ignore_signature_keys: Sequence[str] = ()):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if not isinstance(keep_best, int) or keep_best < 1:
            raise ValueError(f"keep_best must be an int >= 1, got {keep_best!r}")
        self.directory = paths.directory_string(directory)  # a local path or a URL (gs://...)
        self.read_only = read_only
        self.best_metric, self.best_mode = best_metric, best_mode
        self._model = {"format": _FORMAT, "tasks": normalize_tasks(tasks),
                       "signature": _to_json(model_signature, "model_signature")}
        self._run_config = _to_json(run_config, "run_config")
        self._ignore = tuple(ignore_signature_keys)
        self._pending: Optional[int] = None  # step of the async save possibly still writing

        policies = [ocp.checkpoint_managers.LatestN(n=keep_last)]
        best_fn = None
        if best_metric is not None:
            worst = math.inf if best_mode == "min" else -math.inf

            def best_fn(metrics):
                # A score taken under another task set (before tasks were added) does not
                # compete: it averaged other tasks, and its checkpoint no longer fits the model.
                return metrics[best_metric] if self._same_tasks(metrics) else worst
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=best_fn, reverse=(best_mode == "min"), n=keep_best,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=best_fn, best_mode=best_mode,  # best_fn also makes orbax store the metrics
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only)
        self._options = options
        self._mgr = self._new_manager()

    def _new_manager(self, cleanup_tmp: bool = True) -> ocp.CheckpointManager:
        options = dataclasses.replace(
            self._options, cleanup_tmp_directories=cleanup_tmp and not self.read_only)
        handlers = {STATE: ocp.PyTreeCheckpointHandler(), DATA_STATE: ocp.JsonCheckpointHandler(),
                    RUN_CONFIG: ocp.JsonCheckpointHandler(), MODEL: ocp.JsonCheckpointHandler()}
        return ocp.CheckpointManager(self.directory, item_names=_ITEMS, item_handlers=handlers,
                                     options=options)

    # --- queries
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def _same_tasks(self, metrics: Mapping) -> bool:
        """Whether `metrics` were taken with this run's tasks (saved with them as "_tasks";
        older checkpoints' metrics, without it, count as taken with them)."""
        tasks = metrics.get(TASKS_KEY)
        return tasks is None or list(tasks) == [t["name"] for t in self._model["tasks"]]

    def best_step(self, metric: Optional[str] = None, mode: Optional[str] = None) -> Optional[int]:
        """The kept step with the best `metric` (default ``best_metric``; `mode` 'max' or
        'min', default ``best_mode``) among those evaluated with this run's tasks; None when
        no kept step has that metric."""
        metric = metric or self.best_metric
        mode = mode or self.best_mode
        if metric is None:
            return None
        if mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {mode!r}")
        best, best_value = None, None
        for step in self.all_steps():
            m = self._mgr.metrics(step) or {}
            value = m.get(metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not self._same_tasks(m):
                continue
            if best is None or (value > best_value if mode == "max" else value < best_value):
                best, best_value = step, value
        return best

    def run_config(self, step: int) -> Any:
        """The run config saved with `step` (the JSON the training run passed)."""
        self.wait_until_finished()
        return self._mgr.restore(step, args=ocp.args.Composite(**{
            RUN_CONFIG: ocp.args.JsonRestore()}))[RUN_CONFIG]

    def metrics(self, step: int) -> Optional[dict]:
        return self._mgr.metrics(step)

    # --- saving
    def _save_failed(self, step: int, err: BaseException) -> CheckpointSaveError:
        self._pending = None
        # orbax keeps the failure in several background writers (step metadata, each item),
        # each raising once: join them all, then start over with a manager reading the disk.
        # Array writes of the failed step may still be in flight into its temporary directory,
        # so that directory is left alone here (the next process start removes it).
        for _ in range(8):
            try:
                self._mgr.close()
                break
            except Exception:  # noqa: BLE001 -- already reported as `err`
                continue
        self._mgr = self._new_manager(cleanup_tmp=False)
        prev = self._mgr.latest_step()
        full = _is_disk_full(err)
        cause = "the disk is full (ENOSPC)" if full else "a write error"
        # In a bucket (gs://) orbax writes the step in place and commits it with a
        # commit_success.txt file; on a filesystem it renames a temporary directory.
        left = (f"in {step}/ without its commit_success.txt, which restore ignores"
                if paths.is_url(self.directory) else
                f"in a '{step}.orbax-checkpoint-tmp*' directory that restore ignores")
        return CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed: {cause}: "
            f"{type(err).__name__}: {err}. The previous checkpoint "
            f"({'step %d' % prev if prev is not None else 'none'}) is intact; the incomplete step "
            f"is left {left}.",
            step=step, directory=self.directory, disk_full=full)

    def wait_until_finished(self) -> None:
        """Blocks until the last asynchronous save is committed; raises CheckpointSaveError."""
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- any background failure becomes a named error
            raise self._save_failed(self._pending if self._pending is not None else -1, e) from e
        self._pending = None

    def save(self, step: int, state: Any, *, data_state: Any,
             metrics: Optional[Mapping[str, float]] = None) -> bool:
        """Starts saving ``state`` as ``step``; returns False if ``step`` is already saved.

        ``data_state`` is the data iterator's state (JSON). ``metrics`` ranks the checkpoint
        for ``best_metric`` (evaluation steps); checkpoints without metrics are kept only while
        they are among the last ``keep_last``.
        """
        if self.read_only:
            raise RuntimeError(f"save(step={step}): the Checkpointer of {self.directory} was "
                               f"opened with read_only=True")
        step = int(step)
        payload_data = _to_json(data_state, "data_state")
        if metrics is not None:
            metrics = dict(_to_json(metrics, "metrics"),
                           **{TASKS_KEY: [t["name"] for t in self._model["tasks"]]})
            if self.best_metric is not None:
                if self.best_metric not in metrics:
                    raise KeyError(f"save(step={step}): metrics lack best_metric "
                                   f"{self.best_metric!r}; got {sorted(metrics)}")
                value = metrics[self.best_metric]
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"save(step={step}): metric {self.best_metric!r} = {value!r} "
                                     f"is not a finite number")
        _check_leaves(state)
        self.wait_until_finished()  # a failure of the previous async save surfaces here
        if step in self._mgr.all_steps():
            return False
        args = ocp.args.Composite(**{
            STATE: ocp.args.PyTreeSave(state), DATA_STATE: ocp.args.JsonSave(payload_data),
            RUN_CONFIG: ocp.args.JsonSave(self._run_config), MODEL: ocp.args.JsonSave(self._model)})
        try:
            saved = self._mgr.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001
            if not any(isinstance(c, OSError) for c in _exception_chain(e)) and not _is_disk_full(e):
                raise  # not an I/O failure (a bug or bad input): orbax's own message
            raise self._save_failed(step, e) from e
        self._pending = step if saved else None
        return saved

    def close(self) -> None:
        """Waits for the last save and releases orbax's threads. Call before the process exits."""
        try:
            self.wait_until_finished()
        finally:
            self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- restoring
    def restore_latest(self, target: Any, **kwargs) -> Optional[Restored]:
        """Restores the most recent checkpoint into ``target``'s structure; None if there is none.

        See ``restore`` for ``target`` and the keyword arguments.
        """
        step = self.latest_step()
        return None if step is None else self.restore(step, target, **kwargs)

    def restore_best(self, target: Any, *, metric: Optional[str] = None,
                     mode: Optional[str] = None, **kwargs) -> Optional[Restored]:
        step = self.best_step(metric, mode)
        return None if step is None else self.restore(step, target, **kwargs)

    def restore(self, step: int, target: Any, *, allow_new_tasks: bool = False,
                allow_removed_tasks: bool = False, shardings: Any = None) -> Restored:
        """Restores ``step`` into the structure, dtypes and shardings of ``target``.

        ``target`` is the train state of the current run: concrete arrays (e.g. the freshly
        initialised state) or ``jax.ShapeDtypeStruct``s carrying ``sharding`` (e.g. from
        ``jax.eval_shape``), so a sharded run restores sharded. Adding tasks needs concrete
        leaves for the new tasks (they are the new tasks' initial values).

        ``shardings`` (a tree of ``jax.sharding.Sharding`` like ``target``'s) overrides the
        target leaves' shardings: every array comes back placed as the run's step takes it,
        each process reading its own shards. A run on several processes needs it: there a
        fresh target's arrays sit on each process's own devices, and arrays restored there
        cannot be moved onto the global mesh afterwards (no cross-host transfers). New tasks'
        leaves (``allow_new_tasks``) are placed with these shardings too.
        """
        self.wait_until_finished()  # restoring reads what the last save wrote
        meta = self._mgr.restore(step, args=ocp.args.Composite(**{
            DATA_STATE: ocp.args.JsonRestore(), RUN_CONFIG: ocp.args.JsonRestore(),
            MODEL: ocp.args.JsonRestore()}))
        saved_model = meta[MODEL]
        where = os.path.join(self.directory, str(step))
        if not isinstance(saved_model, dict) or "tasks" not in saved_model:
            raise CheckpointMismatchError(f"{where}: no mtlx model record (item {MODEL!r}); "
                                          f"not a checkpoint written by mtlx.train.checkpoint")
        diff = compare_model_spec(saved_model, self._model, self._ignore)
        refused = (diff.signature or diff.changed or diff.reordered
                   or (diff.added and not allow_new_tasks)
                   or (diff.removed and not allow_removed_tasks))
        if refused:
            raise CheckpointMismatchError(
                f"checkpoint {where} was written by a different model or task set than this "
                f"run:\n  " + "\n  ".join(diff.describe()))

        if diff:
            state, fresh = self._restore_merged(step, target, diff, where, shardings)
        else:
            abstract = jax.tree.map(_abstract, target, *([] if shardings is None else [shardings]))
            try:
                state = self._mgr.restore(step, args=ocp.args.Composite(**{
                    STATE: ocp.args.PyTreeRestore(
                        item=abstract,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))}))[STATE]
            except ValueError as e:
                raise CheckpointMismatchError(
                    f"checkpoint {where}: the saved train state does not fit the target "
                    f"state's structure: {e}") from e
            fresh = ()
        return Restored(step=step, state=state, data_state=meta[DATA_STATE],
                        run_config=meta[RUN_CONFIG], tasks=saved_model["tasks"],
                        model_signature=saved_model.get("signature"), fresh_paths=fresh)

    def _restore_merged(self, step: int, target: Any, diff: ModelDiff, where: str,
                        shardings: Any = None):
        """Restore by leaf name when the task set changed: old leaves from disk, new from target.

        The checkpoint is read to host memory in its own structure, then each target leaf takes
        the saved leaf of the same name or, for new tasks, its own value, placed with
        ``shardings`` (default: the target's own).
        """
        saved_meta = self._mgr.item_metadata(step)[STATE]
        saved_meta = getattr(saved_meta, "tree", saved_meta)
        host_target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved_meta)
        saved = self._mgr.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(
                item=host_target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(host_target))}))[STATE]
        saved_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(saved_meta)[0]]
        by_name = {_leaf_name(p): v for p, v in zip(saved_paths, jax.tree.leaves(saved))}
        parts_of = {_leaf_name(p): {_key_name(k) for k in p} for p in saved_paths}
        added, removed = set(diff.added), set(diff.removed)
        used, fresh, missing, reshaped, abstract_fresh = set(), [], [], [], []

        def pick(path, leaf, sharding=None):
            name = _leaf_name(path)
            if any(_key_name(k) in added for k in path):
                pass  # a new task's leaf: the target's value
            elif name not in by_name:
                missing.append(name)
            elif by_name[name].shape != _stored_shape(leaf):
                used.add(name)
                reshaped.append(f"{name}: checkpoint {by_name[name].shape}, "
                                f"this run {_stored_shape(leaf)}")
            else:
                used.add(name)
                return _place(by_name[name], leaf, sharding)
            fresh.append(name)
            if isinstance(leaf, jax.ShapeDtypeStruct):
                abstract_fresh.append(name)
            elif sharding is not None and isinstance(leaf, jax.Array):
                # the initial value put on the run's sharding from the host (each process
                # holds all of it and keeps its own shards)
                return _place(np.asarray(jax.device_get(
                    jax.random.key_data(leaf) if _is_key_array(leaf) else leaf)), leaf, sharding)
            return leaf

        state = jax.tree_util.tree_map_with_path(
            pick, target, *([] if shardings is None else [shardings]))
        unused = [n for n in by_name if n not in used and not (parts_of[n] & removed)]
        if missing or unused:
            raise CheckpointMismatchError(
                f"checkpoint {where}: the saved train state does not fit the target state:"
                + (f"\n  not in the checkpoint: {missing}" if missing else "")
                + (f"\n  in the checkpoint only: {unused}" if unused else ""))
        if abstract_fresh:
            raise CheckpointMismatchError(
                f"checkpoint {where}: state leaves {abstract_fresh} must be initialised fresh "
                f"(new tasks or per-task shapes that changed) but the target is abstract there; "
                f"pass the freshly initialised state as target")
        if reshaped:
            log.warning("checkpoint %s: re-initialised state leaves whose per-task shape changed "
                        "with the task set: %s", where, reshaped)
        return state, tuple(fresh)


def _place(value: np.ndarray, like: Any, sharding: Any = None):
    """A host value (key data for a key leaf), as the type/dtype of target leaf ``like``, an
    array placed with ``sharding`` (default: ``like``'s own; numpy leaves stay on the host)."""
    arrays = (jax.Array, jax.ShapeDtypeStruct)
    sharding = (sharding or like.sharding) if isinstance(like, arrays) else None
    if _is_key_array(like):
        # An abstract key has no public impl accessor; its dtype carries the impl.
        impl = jax.random.key_impl(like) if isinstance(like, jax.Array) else like.dtype._impl
        keys = jax.random.wrap_key_data(np.asarray(value), impl=impl)
        return jax.device_put(keys, sharding) if sharding is not None else keys
    if isinstance(like, (bool, int, float)) and not isinstance(like, np.generic):
        return type(like)(np.asarray(value).item())
    value = np.asarray(value).astype(like.dtype, copy=False)
    # As orbax does: arrays and sharded abstract leaves go to devices, the rest stays numpy.
    return jax.device_put(value, sharding) if sharding is not None else value


# ----------------------------------------------------------------------------- preemption

class PreemptionFlag:
    """Set by SIGTERM (or ``set()``); the training loop polls ``is_set()`` after each step."""

    def __init__(self):
        self._event = threading.Event()
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def set(self, signum: Optional[int] = None) -> None:
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self.signum = None
        self._event.clear()

    def uninstall(self) -> None:
        """Restores the signal handlers that were in place before ``install_preemption_handler``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def install_preemption_handler(callback: Optional[Callable[[int], None]] = None,
                               signals: Sequence[int] = (signal.SIGTERM,)) -> PreemptionFlag:
    """Turns ``signals`` (default SIGTERM, what schedulers send before killing) into a flag.

    The handler only sets the flag and calls ``callback(signum)`` (keep it tiny: it runs in the
    main thread between two bytecodes). The loop saves and exits when it sees the flag. Must be
    called from the main thread (Python delivers signals there only).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_preemption_handler must be called from the main thread "
                           "(Python runs signal handlers only there)")
    flag = PreemptionFlag()

    def handler(signum, frame):  # noqa: ARG001
        flag.set(signum)
        if callback is not None:
            callback(signum)

    for sig in signals:
        flag._previous[sig] = signal.signal(sig, handler)
    return flag


def preemption_sync_manager_running() -> bool:
    """Whether JAX's preemption sync manager runs in this process: `jax.distributed.initialize`
    starts it (and its SIGTERM notifier) unless `jax_enable_preemption_service` is off."""
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    state = jax_distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class PreemptionWatch:
    """When the training loop stops for a preemption (SIGTERM): ``should_stop(step)`` after
    each step, true at the same step on every process.

    - One process: ``install_preemption_handler``'s flag.
    - Several processes with JAX's preemption sync manager (the default after
      `jax.distributed.initialize`): its own SIGTERM notifier tells the coordination service,
      which picks the step after the furthest any process has reported; each process then asks
      `multihost_utils.reached_preemption_sync_point(step)`, a check of local state that keeps
      no device waiting, so the host goes on dispatching steps ahead of the devices. No Python
      handler is installed (it would replace the notifier). The loop must call this with every
      step, the same sequence on every process (as Orbax's CheckpointManager does too).
    - Several processes without it (`jax_enable_preemption_service` off): the flag is
      all-gathered after every step; that collective waits for the step to finish, so the host
      cannot run ahead.
    """

    def __init__(self, multi_process: bool):
        self.mode = ("sync_manager" if multi_process and preemption_sync_manager_running()
                     else "allgather" if multi_process else "flag")
        self.flag = PreemptionFlag() if self.mode == "sync_manager" else install_preemption_handler()

    @property
    def signum(self) -> Optional[int]:
        return self.flag.signum

    def should_stop(self, step: int) -> bool:
        if self.mode == "sync_manager":
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self.flag.set(signal.SIGTERM)  # the notifier's signal; the loop reports it
            return self.flag.is_set()
        stop = self.flag.is_set()
        if self.mode == "allgather":
            from jax.experimental import multihost_utils
            stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
        return stop

    def close(self) -> None:
        self.flag.uninstall()
