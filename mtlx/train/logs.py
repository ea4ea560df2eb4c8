"""Run logging: TensorBoard event files, a JSONL log, and PNG curves at the end."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Optional


def atomic_write_text(path: Path, text: str) -> None:
    """Writes via a temporary file and rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """Scalars to `workdir/tensorboard` (event files) and `workdir/metrics.jsonl`."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self.history = defaultdict(list)  # name -> [(step, value)]
        self._tb = None
        self._jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
            self._jsonl = open(self.workdir / "metrics.jsonl", "a")

    def write(self, step: int, scalars: Mapping[str, float], kind: str = "train") -> None:
        clean = {k: float(v) for k, v in scalars.items()}
        for k, v in clean.items():
            self.history[k].append((step, v))
        if not self.enabled:
            return
        for k, v in clean.items():
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **clean}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def plot(self, out_dir: Optional[Path] = None) -> list:
        """loss_curves.png (train and eval losses per task) and metric_curves.png."""
        if not self.enabled:
            return []
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        out_dir = Path(out_dir or self.workdir / "plots")
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
            fig.savefig(out_dir / name, dpi=100)
            plt.close(fig)
            written.append(out_dir / name)
        return written
