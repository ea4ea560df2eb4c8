"""Run logging: TensorBoard event files, a JSONL log, and PNG curves at the end."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from typing import Mapping, Optional

from mtlx import paths


def plot_groups(keys) -> dict:
    """{png name: the logged keys it plots}: losses (train and eval, per task) and eval
    metrics; breakdowns ('eval/squad_v2/has_answer.f1', best thresholds) stay in metrics.jsonl."""
    return {
        "loss_curves.png": sorted({k for k in keys if k.startswith(("train/loss", "eval/"))
                                   and k.endswith("/loss") or k.startswith("train/loss")}),
        "metric_curves.png": sorted(k for k in keys if k.startswith("eval/") and not k.endswith("/loss")
                                    and "." not in k.rsplit("/", 1)[-1]),
    }


class RunLogger:
    """Scalars to `workdir/tensorboard` (event files) and `workdir/metrics.jsonl`; `workdir`
    is a local directory or a URL (gs://...: mtlx.paths). metrics.jsonl is strict JSON: a
    value that is not finite is written null (TensorBoard gets finite values only).

    In a bucket the event file is written in a local temporary directory and, after each
    `write`, what it gained since the last upload is appended to its object
    (`paths.ObjectAppender`: composed onto it in gs://; tensorboardX's own GCS writer uploads
    the whole file at each flush, and again from `__del__` at interpreter exit, when the store
    may be gone). Events are written synchronously and flushed at each `write`, so
    TensorBoard reading the bucket sees each logging interval as it is written.
    """

    def __init__(self, workdir: paths.PathLike, enabled: bool = True,
                 resume_step: Optional[int] = None):
        """`resume_step`: the step a resumed run restarts from. metrics.jsonl keeps the rows up
        to it (later ones were logged by steps the checkpoint does not hold, which the resumed
        run logs again), the history (the curves' data) starts from them, and TensorBoard is
        told to drop its events after it (a SessionLog START at resume_step + 1)."""
        self.workdir = paths.as_path(workdir)
        self.enabled = enabled
        self.history = defaultdict(list)  # name -> [(step, value)]
        self._tb = None
        self._jsonl = None
        self._staging = None  # the local event files of a run in a bucket
        self._uploaded = {}   # event file name -> (its ObjectAppender, bytes uploaded)
        if enabled:
            from tensorboardX.event_file_writer import EventsWriter
            events = self.workdir / "tensorboard"
            if paths.is_url(self.workdir):
                self._staging = tempfile.mkdtemp(prefix="mtlx_tensorboard_")
                events = self._staging
            os.makedirs(events, exist_ok=True)
            # tensorboardX's synchronous writer: its SummaryWriter hands events to a thread,
            # and its flush() does not wait for the events still queued, so an upload right
            # after it could miss the interval's last scalars.
            # the name's time is in seconds: a suffix keeps a run resumed within the same
            # second from truncating the file it resumes (the writer opens it with 'wb')
            self._tb = EventsWriter(os.path.join(os.fspath(events), "events"),
                                    filename_suffix=f".{uuid.uuid4().hex[:8]}")
            self._jsonl = paths.LineLog(self.workdir / "metrics.jsonl",
                                        written=self._resume(resume_step))

    def _resume(self, step: Optional[int]) -> Optional[str]:
        """Keeps metrics.jsonl's rows up to `step` (written back if that changed the file) and
        takes them into the history; returns the log's text (None: no log to resume), so that
        LineLog need not read it again."""
        path = self.workdir / "metrics.jsonl"
        if step is None or not path.exists():
            return None
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        self._tb.write_event(Event(wall_time=time.time(), step=int(step) + 1,
                                   session_log=SessionLog(status=SessionLog.START)))
        original, kept = path.read_text(), []
        for line in original.splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the crash
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] > step:
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
            for k, v in row.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.history[k].append((row["step"], float(v)))
        text = "".join(kept)
        if text != original:
            paths.write_atomic(path, text)
        return text

    def _upload_events(self) -> None:
        remote = self.workdir / "tensorboard"
        for name in sorted(os.listdir(self._staging)):
            local = os.path.join(self._staging, name)
            size = os.path.getsize(local)
            appender, sent = self._uploaded.get(name) or (paths.ObjectAppender(remote / name), 0)
            if size <= sent:
                continue

            def read(start, local=local, size=size):  # bytes [start, size) of the local file
                with open(local, "rb") as f:
                    f.seek(start)
                    return f.read(size - start)
            # only what the file gained is read, unless the object is written whole
            appender.append(read(sent), lambda: read(0))
            self._uploaded[name] = (appender, size)

    def write(self, step: int, scalars: Mapping[str, float], kind: str = "train") -> None:
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self.history[k].append((step, v))
        if not self.enabled:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar
        now = time.time()
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.write_event(Event(wall_time=now, step=int(step), summary=scalar(k, v)))
        self._tb.flush()
        # strict JSON: a value that is not finite (an undefined metric, no learning rate) is null
        record = {k: v if math.isfinite(v) else None for k, v in clean.items()}
        self._jsonl.append(json.dumps({"step": step, "kind": kind, **record}) + "\n")
        if self._staging is not None:
            self._upload_events()

    def close(self) -> None:
        """Flushes and closes the event writer, uploads what is left (a run in a bucket) and
        removes the staging directory. Safe to call again."""
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()  # flushes
        if self._staging is not None:
            self._upload_events()
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def plot(self, out_dir: Optional[paths.PathLike] = None) -> list:
        """loss_curves.png (train and eval losses per task) and metric_curves.png."""
        if not self.enabled:
            return []
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        out_dir = paths.as_path(out_dir or self.workdir / "plots")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name, keys in plot_groups(self.history).items():
            if not keys:
                continue
            fig, ax = plt.subplots(figsize=(8, 5))
            for k in keys:
                steps, vals = zip(*self.history[k])
                ax.plot(steps, vals, label=k, marker="." if len(steps) < 30 else None)
            ax.set_xlabel("step")
            ax.set_title(name[:-4].replace("_", " "))
            ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            paths.savefig(fig, out_dir / name, dpi=100)
            plt.close(fig)
            written.append(out_dir / name)
        return written
