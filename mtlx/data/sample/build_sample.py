"""Rebuilds the embedded sample from the staged full data (run once; the output is committed).

    python mtlx/data/sample/build_sample.py /work/shared/data

Rows are chosen at random (fixed seed) and written in their original order, byte for byte:
headers, the MRPC BOM, CoLA's header-less layout and CoLA dev's missing final newline are kept
(the last data row of every file is always kept so the end-of-file state is the original one).
CoNLL-U sentences are copied whole, comments included; one sentence with an empty node (8.1)
and several with multiword tokens are always kept so the reader's special cases stay exercised.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0

# (relative path, has header, rows to keep); QNLI train is not staged (see SOURCES.md).
TSV_FILES = [
    ("glue/CoLA/train.tsv", False, 300), ("glue/CoLA/dev.tsv", False, 150),
    ("glue/CoLA/test.tsv", True, 40),
    ("glue/SST-2/train.tsv", True, 300), ("glue/SST-2/dev.tsv", True, 150),
    ("glue/SST-2/test.tsv", True, 40),
    ("glue/MRPC/train.tsv", True, 300), ("glue/MRPC/dev.tsv", True, 150),
    ("glue/MRPC/test.tsv", True, 40),
    ("glue/STS-B/train.tsv", True, 300), ("glue/STS-B/dev.tsv", True, 150),
    ("glue/STS-B/test.tsv", True, 40),
    ("glue/RTE/train.tsv", True, 300), ("glue/RTE/dev.tsv", True, 150),
    ("glue/RTE/test.tsv", True, 40),
    ("glue/WNLI/train.tsv", True, 300), ("glue/WNLI/dev.tsv", True, 71),
    ("glue/WNLI/test.tsv", True, 40),
    ("glue/QNLI/dev.tsv", True, 300), ("glue/QNLI/test.tsv", True, 40),
]
CONLLU_FILES = [
    ("ud_english_ewt/en_ewt-ud-train.conllu", 400),
    ("ud_english_ewt/en_ewt-ud-dev.conllu", 150),
    ("ud_english_ewt/en_ewt-ud-test.conllu", 100),
]
COPIED = [
    "vocab/bert-base-uncased/vocab.txt", "glue/STS-B/LICENSE.txt", "ud_english_ewt/LICENSE.txt",
]


def _sample_tsv(src: Path, dst: Path, header: bool, keep: int, rng: random.Random) -> int:
    lines = src.read_bytes().splitlines(keepends=True)
    head, rows = (lines[:1], lines[1:]) if header else ([], lines)
    keep = min(keep, len(rows))
    chosen = set(rng.sample(range(len(rows) - 1), keep - 1)) | {len(rows) - 1}
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"".join(head + [rows[i] for i in sorted(chosen)]))
    return keep


def _sample_conllu(src: Path, dst: Path, keep: int, rng: random.Random) -> int:
    blocks = src.read_text(encoding="utf-8").split("\n\n")
    blocks = [b.strip("\n") + "\n" for b in blocks if b.strip()]
    special = [i for i, b in enumerate(blocks)
               if any(line.split("\t")[0].count(".") for line in b.splitlines()
                      if line and not line.startswith("#"))][:1]
    mwt = [i for i, b in enumerate(blocks)
           if any("-" in line.split("\t")[0] for line in b.splitlines()
                  if line and not line.startswith("#"))][:3]
    forced = set(special) | set(mwt)
    rest = [i for i in range(len(blocks)) if i not in forced]
    chosen = sorted(forced | set(rng.sample(rest, keep - len(forced))))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(blocks[i] + "\n" for i in chosen), encoding="utf-8")
    return len(chosen)


def main(root: str) -> None:
    src_root = Path(root)
    rng = random.Random(SEED)
    report = []
    for rel, header, keep in TSV_FILES:
        n = _sample_tsv(src_root / rel, HERE / rel, header, keep, rng)
        report.append((rel, n))
    for rel, keep in CONLLU_FILES:
        n = _sample_conllu(src_root / rel, HERE / rel, keep, rng)
        report.append((rel, n))
    for rel in COPIED:
        (HERE / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / rel, HERE / rel)
    for rel, n in report:
        digest = hashlib.sha256((HERE / rel).read_bytes()).hexdigest()[:16]
        print(f"| `{rel}` | {n} | `{digest}` |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data")
