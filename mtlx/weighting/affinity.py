"""Task affinity over a run: gradient cosines, TAG's lookahead affinity, suggested task groups.

    probe = jax.jit(mtlx.train.step.make_affinity_probe(model, lookahead_lr=1e-3))
    report = AffinityReport(task_names, workdir / "affinity")
    scalars = report.add(step, jax.device_get(probe(params, batch)))   # each evaluation interval
    paths = report.write()                                             # at the end of the run

Lookahead affinity (TAG: Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task
Groupings for Multi-Task Learning", NeurIPS 2021, eq. 3):

    Z[i, j] = Z_{i->j} = 1 - L_j(theta_s after a step on task i only) / L_j(theta_s)

positive when a step on task i lowers task j's loss. It is averaged over the evaluation
intervals (TAG averages over training steps). Task groups are then chosen to maximise the
total intra-group affinity (TAG's network-selection objective, restricted to a partition of the
tasks into a given number of groups): each task j of a group g scores the mean of Z[i, j] over
the other members i of g (0 for a task alone), and a grouping scores the sum over tasks.
`group_tasks` enumerates every partition when there are at most `max_exhaustive` of them
(Stirling numbers: 8 tasks into 3 groups is 966 partitions, 10 into 5 is 42,525) and otherwise
merges greedily, then moves single tasks while that improves the score.

Pairs never observed together (a task absent whenever the other was probed) are NaN in the
averages and count 0 in the grouping score.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from mtlx import paths

Array = Any


def lookahead_affinity(losses: Array, after_losses: Array, present: Array) -> Array:
    """Z [T, T] from the losses before [T] and after a step on each task [T_i, T_j].

    Z[i, j] = 1 - after_losses[i, j] / losses[j]; NaN where task i or j is absent from the
    batch or L_j = 0 (undefined). Pure jnp (runs inside the compiled probe).
    """
    ok = present[:, None] & present[None, :] & (losses[None, :] > 0)
    ratio = after_losses / jnp.where(ok, losses[None, :], 1.0)
    return jnp.where(ok, 1.0 - ratio, jnp.nan)


# ----------------------------------------------------------------------------- grouping

def stirling2(n: int, k: int) -> int:
    """Number of partitions of n items into k non-empty groups."""
    if k < 0 or k > n:
        return 0
    return sum((-1) ** i * math.comb(k, i) * (k - i) ** n for i in range(k + 1)) // math.factorial(k)


def set_partitions(n: int, k: int):
    """Yields every partition of range(n) into k non-empty groups as a label array [n]
    (restricted growth strings: item 0 in group 0, each new group opened in order)."""
    labels = [0] * n

    def rec(i: int, used: int):
        if n - i < k - used:
            return
        if i == n:
            if used == k:
                yield np.asarray(labels)
            return
        for g in range(min(used + 1, k)):
            labels[i] = g
            yield from rec(i + 1, max(used, g + 1))

    if n == 0:
        return
    yield from rec(0, 0)


def _scores(affinity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Scores of partitions given as labels [P, T] (vectorised `grouping_score`)."""
    a = np.nan_to_num(np.asarray(affinity, np.float64), nan=0.0)
    t = a.shape[0]
    same = labels[:, :, None] == labels[:, None, :]
    same &= ~np.eye(t, dtype=bool)[None]
    mates = same.sum(1)                                       # [P, T]: group size - 1 per task j
    incoming = np.einsum("pij,ij->pj", same, a)               # sum over mates i of Z[i, j]
    return np.sum(np.where(mates > 0, incoming / np.maximum(mates, 1), 0.0), axis=1)


def grouping_score(affinity: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """sum over groups g, tasks j in g of mean_{i in g, i != j} Z[i, j] (0 for singletons)."""
    t = np.shape(affinity)[0]
    labels = np.full(t, -1)
    for gi, g in enumerate(groups):
        labels[list(g)] = gi
    if np.any(labels < 0):
        raise ValueError(f"grouping {groups} does not cover all {t} tasks")
    return float(_scores(affinity, labels[None])[0])


@dataclasses.dataclass(frozen=True)
class Grouping:
    groups: Tuple[Tuple[int, ...], ...]   # task indices, each group sorted, groups by first task
    score: float
    method: str                          # 'exhaustive' or 'greedy'


def _canonical(labels: np.ndarray) -> Tuple[Tuple[int, ...], ...]:
    groups = {}
    for i, g in enumerate(labels):
        groups.setdefault(int(g), []).append(i)
    return tuple(sorted(tuple(v) for v in groups.values()))


def group_tasks(affinity: np.ndarray, num_groups: int, *, max_exhaustive: int = 250_000
                ) -> Grouping:
    """The partition of the T tasks into `num_groups` groups maximising `grouping_score`.

    Exhaustive when there are at most `max_exhaustive` partitions, greedy otherwise (see the
    module docstring). Ties go to the partition enumerated first.
    """
    a = np.asarray(affinity, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"affinity must be a square [T, T] matrix, got shape {a.shape}")
    t = a.shape[0]
    if not isinstance(num_groups, int) or not 1 <= num_groups <= t:
        raise ValueError(f"config.weighting.report.num_groups: {num_groups!r} groups for {t} "
                         f"tasks; each must be an int in [1, {t}]")
    if stirling2(t, num_groups) <= max_exhaustive:
        best_labels, best = None, -np.inf
        chunk: List[np.ndarray] = []

        def flush():
            nonlocal best_labels, best
            labels = np.stack(chunk)
            s = _scores(a, labels)
            i = int(np.argmax(s))
            if s[i] > best + 1e-12:
                best, best_labels = float(s[i]), labels[i]
            chunk.clear()

        for labels in set_partitions(t, num_groups):
            chunk.append(labels)
            if len(chunk) == 4096:
                flush()
        if chunk:
            flush()
        return Grouping(_canonical(best_labels), best, "exhaustive")
    return _greedy(a, num_groups)


def _greedy(a: np.ndarray, k: int) -> Grouping:
    t = a.shape[0]
    labels = np.arange(t)
    while len(set(labels.tolist())) > k:
        ids = sorted(set(labels.tolist()))
        candidates = []
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                cand = np.where(labels == ids[y], ids[x], labels)
                candidates.append(cand)
        scores = _scores(a, np.stack(candidates))
        labels = candidates[int(np.argmax(scores))]
    # Local search: move one task to another group (never emptying its group).
    score = float(_scores(a, labels[None])[0])
    improved = True
    while improved:
        improved = False
        for i in range(t):
            if np.sum(labels == labels[i]) == 1:
                continue
            for g in sorted(set(labels.tolist()) - {int(labels[i])}):
                cand = labels.copy()
                cand[i] = g
                s = float(_scores(a, cand[None])[0])
                if s > score + 1e-12:
                    labels, score, improved = cand, s, True
                    break
    return Grouping(_canonical(labels), score, "greedy")


# ----------------------------------------------------------------------------- the report

def _jsonable(m: np.ndarray) -> list:
    return [[None if not np.isfinite(x) else float(x) for x in row] for row in np.asarray(m)]


def _from_json(rows: list) -> np.ndarray:
    return np.asarray([[np.nan if x is None else x for x in row] for row in rows], np.float64)


def _nanmean(stack: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(stack)
    n = finite.sum(0)
    total = np.where(finite, stack, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan), n


def weight_scalars(task_weight: Sequence[float], task_count: Sequence[float],
                   names: Sequence[str]) -> Dict[str, float]:
    """{'weighting/weight/<task>': w} for the tasks present in the step's batch."""
    return {f"weighting/weight/{n}": float(w) for n, w, c in zip(names, task_weight, task_count)
            if c > 0}


class AffinityReport:
    """Collects probe results each evaluation interval; writes the run's affinity report.

    Intervals are appended to ``directory/intervals.jsonl`` as they come, so a resumed run's
    report covers the whole run: `resume_step` drops intervals logged after the checkpoint
    the run resumed from.
    """

    def __init__(self, names: Sequence[str], directory: paths.PathLike, *, num_groups: Sequence[int] = (2, 3),
                 max_exhaustive: int = 250_000, resume_step: int = 0, enabled: bool = True):
        self.names = list(names)
        self.directory = paths.as_path(directory)  # local or a URL (mtlx.paths)
        t = len(self.names)
        bad = [k for k in num_groups if not isinstance(k, int) or k < 1]
        if bad:
            raise ValueError(f"config.weighting.report.num_groups: {bad} are not positive ints")
        self.num_groups = sorted({k for k in num_groups if k <= t})
        self.max_exhaustive = max_exhaustive
        self.enabled = enabled
        self.intervals: List[dict] = []
        self._file = self.directory / "intervals.jsonl"
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._file.exists():
                kept = {}
                for line in self._file.read_text().splitlines():
                    rec = json.loads(line)
                    if rec["step"] <= resume_step and rec.get("tasks") == self.names:
                        kept[rec["step"]] = rec   # the last record of a step wins
                self.intervals = [kept[k] for k in sorted(kept)]
            self._rewrite()

    def _rewrite(self):
        text = "".join(json.dumps(r) + "\n" for r in self.intervals)
        paths.write_atomic(self._file, text)
        self._log = paths.LineLog(self._file, written=text)

    def add(self, step: int, probe: Dict[str, Any]) -> Dict[str, float]:
        """Records one probe result; returns the scalars to log (finite entries only)."""
        cos = np.asarray(probe["cosine"], np.float64)
        present = np.asarray(probe["present"], bool)
        both = present[:, None] & present[None, :]
        cos = np.where(both, cos, np.nan)
        z = np.asarray(probe["lookahead"], np.float64)
        rec = {"step": int(step), "tasks": self.names, "present": present.tolist(),
               "cosine": _jsonable(cos), "lookahead": _jsonable(z)}
        self.intervals = [r for r in self.intervals if r["step"] != rec["step"]] + [rec]
        if self.enabled:
            self._log.append(json.dumps(rec) + "\n")
        scalars = {}
        for i, a in enumerate(self.names):
            for j, b in enumerate(self.names):
                if i < j and np.isfinite(cos[i, j]):
                    scalars[f"affinity/cosine/{a}~{b}"] = float(cos[i, j])
                if i != j and np.isfinite(z[i, j]):
                    scalars[f"affinity/lookahead/{a}->{b}"] = float(z[i, j])
        return scalars

    def summary(self) -> Dict[str, Any]:
        """Means over the intervals and the suggested groupings."""
        if not self.intervals:
            return {"tasks": self.names, "intervals": 0}
        cos, n_cos = _nanmean(np.stack([_from_json(r["cosine"]) for r in self.intervals]))
        z, n_z = _nanmean(np.stack([_from_json(r["lookahead"]) for r in self.intervals]))
        groupings = {}
        for k in self.num_groups:
            g = group_tasks(z, k, max_exhaustive=self.max_exhaustive)
            groupings[str(k)] = {"groups": [[self.names[i] for i in grp] for grp in g.groups],
                                 "score": g.score, "method": g.method}
        return {"tasks": self.names, "intervals": len(self.intervals),
                "steps": [r["step"] for r in self.intervals],
                "cosine": _jsonable(cos), "cosine_count": n_cos.tolist(),
                "lookahead": _jsonable(z), "lookahead_count": n_z.tolist(),
                "groupings": groupings}

    def write(self) -> list:
        """affinity.json, affinity.md (tables) and affinity.png (heat maps) in `directory`."""
        if not self.enabled:
            return []
        s = self.summary()
        written = [self.directory / "affinity.json", self.directory / "affinity.md"]
        paths.write_atomic(written[0], json.dumps(s, indent=2))
        paths.write_atomic(written[1], format_report(s))
        if s["intervals"]:
            written.append(plot_heatmaps(s, self.directory / "affinity.png"))
        return written


def _table(names: Sequence[str], m: np.ndarray, corner: str) -> str:
    lines = ["| " + corner + " | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for i, a in enumerate(names):
        cells = ["" if not np.isfinite(x) else f"{x:+.4g}" for x in m[i]]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(s: Dict[str, Any]) -> str:
    """The report as Markdown: both matrices and the suggested groupings."""
    names = s["tasks"]
    out = ["# Task affinity", ""]
    if not s.get("intervals"):
        return "\n".join(out + ["No evaluation interval was probed.", ""])
    out += [f"Averaged over {s['intervals']} evaluation interval(s), steps {s['steps']}.", "",
            "## Gradient cosine similarity (shared parameters)", "",
            _table(names, _from_json(s["cosine"]), "cos"), "",
            "## Lookahead affinity Z[i -> j] = 1 - L_j(after a step on i) / L_j "
            "(TAG, Fifty et al. 2021); row i = the task stepped on", "",
            _table(names, _from_json(s["lookahead"]), "i \\ j"), "",
            "## Suggested groupings (maximum total intra-group lookahead affinity)", ""]
    for k, g in s["groupings"].items():
        groups = " | ".join("{" + ", ".join(grp) + "}" for grp in g["groups"])
        out.append(f"- {k} groups ({g['method']}, score {g['score']:+.4f}): {groups}")
    return "\n".join(out + [""])


def plot_heatmaps(s: Dict[str, Any], path: paths.PathLike):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = s["tasks"]
    t = len(names)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * t, 2 + 0.55 * t))
    for ax, key, title in ((axes[0], "cosine", "gradient cosine"),
                           (axes[1], "lookahead", "lookahead affinity Z[i->j]")):
        m = _from_json(s[key])
        off = np.where(np.eye(t, dtype=bool), np.nan, m)  # the diagonal would dominate
        lim = float(np.nanmax(np.abs(off))) if np.isfinite(off).any() else 1.0
        im = ax.imshow(np.ma.masked_invalid(m), cmap="RdBu", vmin=-lim or -1, vmax=lim or 1)
        ax.set_xticks(range(t), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(t), names, fontsize=8)
        for i in range(t):
            for j in range(t):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[1].set_ylabel("stepped on task i", fontsize=8)
    axes[1].set_xlabel("loss of task j", fontsize=8)
    fig.tight_layout()
    path = paths.as_path(path)
    paths.savefig(fig, path, dpi=100)
    plt.close(fig)
    return path
