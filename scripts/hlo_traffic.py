"""A memory-traffic model of a compiled step: the bytes each top-level op of an XLA module reads
(its operands) and writes (its result), summed by what the op is for.

    python scripts/hlo_traffic.py step.hlo.txt[.gz]                  # categories
    python scripts/hlo_traffic.py step.hlo.txt.gz --top 20           # and the 20 largest ops
    python scripts/hlo_traffic.py step.hlo.txt.gz --detail other     # one category by op_name

The input is the compiled module's text (`jitted.lower(...).compile().as_text()`;
scripts/profile_step.py --hlo-dir writes one per variant, scripts/gpu_profile.sh brings them
back from a lent GPU), so the model needs no device: each fusion, custom call (cuBLAS, cuDNN)
and copy of the ENTRY computation counts its operands once and its result once, as if nothing
stayed in cache. Bytes over the memory bandwidth give the least time such an op can take; on a
memory-bound step (a BERT-base step's elementwise work on an H100) the sum lands near the
measured kernel time (BUILD_NOTES.md). Categories come from the ops' `op_name` metadata
(model scopes: dropout, layer_norm, ffn activation, bias gradients, the optimizer). An upper
model: the result buffers of cuBLAS calls include their workspace, and an op that reads a
slice of a larger operand counts the whole operand (XLA merges BERT's query/key/value products
into one [tokens, 3 d] product, and each bias add reads its third).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re
import sys

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "s32": 4, "u32": 4, "s64": 8, "u64": 8, "pred": 1}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([0-9,]*)\]")
_LINE = re.compile(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)(, .*)?$")
_FREE = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant")
# (category, pattern on the op name / custom-call target, pattern on op_name metadata)
CATEGORIES = (
    ("matmul", r"gemm|cublas|dot", None),
    ("attention", r"cudnn|flash|fmha", None),
    ("dropout", None, r"Dropout|_bernoulli|random_bits|threefry"),
    ("layer_norm", None, r"layer_norm"),
    ("ffn activation", None, r"/ffn/(mul|erf|exp|square|neg|tanh|logistic|add_any)\b"),
    ("bias gradients", None, r"transpose\(jvp.*/(query|key|value|input|output|dense)/reduce_sum"),
    ("optimizer", None, r"^jit\([^)]*\)/(add|mul|sub|div|sqrt|select_n|convert_element_type)$"
                        r"|optax|adam|clip|global_norm"),
)


def array_bytes(shape: str) -> int:
    """Bytes of every array in a shape string ('f32[2,3]', '(bf16[4], s8[8])')."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def entry_ops(text: str):
    """[(name, opcode, target, read bytes, written bytes, op_name)] of the ENTRY computation."""
    m = re.search(r"\nENTRY [^\n]*\{\n(.*?)\n\}", text, re.S)
    if not m:
        raise SystemExit("scripts/hlo_traffic.py: no ENTRY computation in the input (is it a "
                         "compiled module's as_text()?)")
    shapes, ops = {}, []
    for line in m.group(1).split("\n"):
        mm = _LINE.match(line)
        if not mm:
            continue
        name, shape, opcode, args, rest = mm.groups()
        rest = rest or ""
        shapes[name] = shape
        if opcode in _FREE:
            continue
        read = sum(array_bytes(shapes.get(a, "")) for a in re.findall(r"%([\w.\-]+)", args))
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        ops.append((name, opcode, target.group(1) if target else "", read, array_bytes(shape),
                    op_name.group(1) if op_name else ""))
    return ops


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")


def collectives(text: str):
    """[(opcode, result bytes, result shape, op_name)] of every collective of a compiled module,
    in any computation (scripts/collectives.py). An asynchronous pair counts once, at its
    '-start', whose result tuple holds the operand too (an upper figure on GPUs; XLA:CPU's
    collectives are synchronous)."""
    out = []
    for line in text.splitlines():
        mm = _LINE.match(line)
        if not mm:
            continue
        _, shape, opcode, _, rest = mm.groups()
        base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if base not in COLLECTIVES:
            continue
        op_name = re.search(r'op_name="([^"]*)"', rest or "")
        out.append((base, array_bytes(shape), shape, op_name.group(1) if op_name else ""))
    return out


def category(op) -> str:
    name, opcode, target, _, _, op_name = op
    for cat, on_name, on_meta in CATEGORIES:
        if on_name and re.search(on_name, f"{name} {target}", re.IGNORECASE):
            return cat
        if on_meta and re.search(on_meta, op_name):
            return cat
    return "other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hlo", help="a compiled module's text (.txt or .txt.gz)")
    p.add_argument("--bandwidth", type=float, default=3.0,
                   help="TB/s for the 'ms at' column (default 3.0: an H100's measured copy rate)")
    p.add_argument("--top", type=int, default=0, help="also list the N ops moving the most bytes")
    p.add_argument("--detail", default=None, help="a category: its bytes by op_name (layers folded)")
    args = p.parse_args(argv)
    opener = gzip.open if args.hlo.endswith(".gz") else open
    with opener(args.hlo, "rt") as f:
        ops = entry_ops(f.read())
    agg = collections.defaultdict(lambda: [0, 0, 0])
    for op in ops:
        a = agg[category(op)]
        a[0] += 1
        a[1] += op[3]
        a[2] += op[4]
    total = sum(a[1] + a[2] for a in agg.values())
    bw = args.bandwidth * 1e12
    print(f"{args.hlo}: {len(ops)} ops, {total / 1e9:.2f} GB read + written "
          f"({1e3 * total / bw:.2f} ms at {args.bandwidth:g} TB/s)")
    print(f"{'category':16s} {'ops':>5s} {'read GB':>8s} {'write GB':>9s} {'ms at':>7s} {'share':>6s}")
    for cat, (n, r, w) in sorted(agg.items(), key=lambda kv: -(kv[1][1] + kv[1][2])):
        print(f"{cat:16s} {n:5d} {r / 1e9:8.2f} {w / 1e9:9.2f} {1e3 * (r + w) / bw:7.2f} "
              f"{100 * (r + w) / max(total, 1):5.1f}%")
    if args.top:
        print(f"\nthe {args.top} ops moving the most bytes")
        for op in sorted(ops, key=lambda o: -(o[3] + o[4]))[:args.top]:
            print(f"{(op[3] + op[4]) / 1e6:9.1f} MB  {op[0][:32]:32s} {category(op):15s} {op[5][-80:]}")
    if args.detail:
        sub = collections.defaultdict(lambda: [0, 0])
        for op in ops:
            if category(op) != args.detail:
                continue
            key = re.sub(r"layer_\d+", "layer_N", re.sub(r"^jit\([^)]*\)/", "", op[5]))
            sub[key][0] += 1
            sub[key][1] += op[3] + op[4]
        print(f"\n{args.detail} by op_name (layers folded)")
        for key, (n, b) in sorted(sub.items(), key=lambda kv: -kv[1][1])[:40]:
            print(f"{b / 1e9:8.3f} GB {n:5d}  {key[-110:]}")
    return agg


if __name__ == "__main__":
    main(sys.argv[1:])
