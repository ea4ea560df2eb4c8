"""The benchmark harness (mtlx.bench, scripts/bench.py): the FLOPs formula against a hand count
and XLA's cost analysis, the PyTorch baseline against mtlx on the same weights, peaks, memory,
timing order, tables and plot. No test asserts a speed."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtlx.batch import make_batch
from mtlx.bench import flops as F
from mtlx.bench import harness as HR
from mtlx.bench import memory as MEM
from mtlx.bench import peaks as PK
from mtlx.bench import report as R
from mtlx.bench import workload as W
from mtlx.models import heads as H
from mtlx.models.bert import BertConfig
from mtlx.models.heads import TaskHead
from mtlx.models.multitask import MultiTaskModel, init_params
from mtlx.peft import registry

REPO = Path(__file__).resolve().parents[1]


def hand_cfg(**kw):
    return BertConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                      intermediate_size=32, max_position_embeddings=16, **kw)


ONE_TASK = (TaskHead("a", "classification", 2),)


# --------------------------------------------------------------------------- FLOPs by hand

def test_flops_full_finetuning_equals_hand_count():
    # B=2, L=4, d=16, f=32, 2 layers. Per token and layer: q,k,v,o 4*16*16 = 1024 MACs, FFN
    # 2*16*32 = 1024, attention (QK^T and PV) 2*4*16 = 128. Tokens 8. Pooler 2*16*16 = 512,
    # head 2*16*2 = 64. Everything trains: 6 FLOPs per MAC.
    model = MultiTaskModel(hand_cfg(), ONE_TASK)
    f = F.step_flops(model, batch_size=2, seq_len=4)
    weights = 2 * 8 * (1024 + 1024)
    attention = 2 * 8 * 128
    assert f.forward == 2 * (weights + attention + 512 + 64)
    assert f.train == 6 * (weights + attention + 512 + 64) == 212352


def test_flops_frozen_backbone_skips_weight_gradients():
    # Frozen encoder weights: 4 FLOPs per MAC (forward + input gradient); attention (two
    # activations) and the trainable head keep 6.
    model = MultiTaskModel(hand_cfg(), ONE_TASK)
    f = F.step_flops(model, 2, 4, backbone_trainable=False)
    assert f.train == 4 * (2 * 8 * 2048 + 512) + 6 * (2 * 8 * 128) + 6 * 64 == 145792


def test_flops_of_extensions_by_hand():
    names = ["a"]
    base = F.step_flops(MultiTaskModel(hand_cfg(), ONE_TASK), 2, 4, backbone_trainable=False).train
    # Houlsby, reduction 4 -> m = 4: 2*16*4 = 128 MACs per token and site, 2 sites x 2 layers.
    cfg = registry.attach(hand_cfg(), [{"method": "adapter", "reduction_factor": 4}], names)
    f = F.step_flops(MultiTaskModel(cfg, ONE_TASK), 2, 4, backbone_trainable=False)
    assert f.train - base == 6 * (4 * 8 * 128)
    # Only the first layer's FFN: one site.
    cfg = registry.attach(hand_cfg(), [{"method": "adapter", "reduction_factor": 4,
                                        "sites": ["encoder.layer0.ffn"]}], names)
    f = F.step_flops(MultiTaskModel(cfg, ONE_TASK), 2, 4, backbone_trainable=False)
    assert f.train - base == 6 * (1 * 8 * 128)
    # LoRA r=2 on query and value: r (16 + 16) = 64 MACs per token, target and layer.
    cfg = registry.attach(hand_cfg(), [{"method": "lora", "rank": 2}], names)
    f = F.step_flops(MultiTaskModel(cfg, ONE_TASK), 2, 4, backbone_trainable=False)
    assert f.train - base == 6 * (2 * 2 * 8 * 64)
    # LoRA on ffn.input (16 -> 32): r (16 + 32) = 96.
    cfg = registry.attach(hand_cfg(), [{"method": "lora", "rank": 2, "targets": ["ffn.input"]}], names)
    f = F.step_flops(MultiTaskModel(cfg, ONE_TASK), 2, 4, backbone_trainable=False)
    assert f.train - base == 6 * (2 * 8 * 96)


def test_flops_of_hyperformer_pp_by_hand():
    tasks = (TaskHead("a", "classification", 2), TaskHead("b", "classification", 2))
    cfg = registry.attach(hand_cfg(), [{"method": "hyperformer++", "reduction_factor": 4}], ["a", "b"])
    base = F.step_flops(MultiTaskModel(hand_cfg(), tasks), 2, 4, backbone_trainable=False).train
    f = F.step_flops(MultiTaskModel(cfg, tasks), 2, 4, backbone_trainable=False)
    m, d = 4, 16
    adapters = 4 * 8 * 2 * d * m                        # 4 sites, 8 tokens
    conditions = 2 * 2 * 2                              # tasks x layers x blocks
    mlp = conditions * (192 * 128 + 128 * 64)
    gen = conditions * 64 * (2 * d * m + m + 3 * d)
    assert f.train - base == 6 * (adapters + mlp + gen)
    assert f.by_name()["hyperformer_pp.generator"] == 6 * (mlp + gen)


def test_flops_errors_name_what_is_not_modelled():
    cfg = registry.attach(hand_cfg(), [{"method": "ia3"}], ["a"])
    with pytest.raises(ValueError, match="no FLOPs model for extension 'ia3'"):
        F.step_flops(MultiTaskModel(cfg, ONE_TASK), 2, 4)
    span = (TaskHead("qa", "span"),)
    with pytest.raises(ValueError, match="task 'qa' of head kind 'span'"):
        F.step_flops(MultiTaskModel(hand_cfg(), span), 2, 4)
    with pytest.raises(ValueError, match="3 task ids for a batch of 2"):
        F.step_flops(MultiTaskModel(hand_cfg(), ONE_TASK), 2, 4, task_ids=[0, 0, 0])


# --------------------------------------------------------------------------- FLOPs vs XLA

XLA_CFG = dict(vocab_size=64, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
               max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
B_XLA, L_XLA = 4, 32


def _xla_flops(fn, *args):
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def _xla_model(methods=()):
    tasks = W.task_heads(2)
    cfg = BertConfig(**XLA_CFG)
    if methods:
        cfg = registry.attach(cfg, methods, [t.name for t in tasks])
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)
    a = W.synthetic_arrays(B_XLA, L_XLA, 64, 0)
    batch = make_batch(task_ids=W.step_task_ids(0, B_XLA, 2), **a)
    return model, batch, init_params(model, jax.random.key(0), batch)


# XLA counts every floating-point operation (LayerNorm, GELU, softmax, biases, the optimizer);
# the model count only the products. With d=128, f=512 the products are ~90% of XLA's count:
# the analytic figure must lie in [0.85, 1.0] of XLA's (below 1: products are a subset).
XLA_BAND = (0.85, 1.0)


@pytest.mark.parametrize("config", ["shared", "adapters", "lora", "hyperformer++"])
def test_forward_flops_within_band_of_xla_cost_analysis(config):
    model, batch, params = _xla_model(W.CONFIGS[config])
    xla = _xla_flops(lambda p, b: model.apply({"params": p}, b), params, batch)
    analytic = F.step_flops(model, B_XLA, L_XLA, task_ids=np.asarray(batch.task_ids).tolist()).forward
    assert XLA_BAND[0] <= analytic / xla <= XLA_BAND[1], (analytic, xla)


def test_train_step_flops_within_band_of_xla_cost_analysis():
    from mtlx.train import optim
    from mtlx.train.step import create_state, make_train_step
    model, batch, params = _xla_model()
    tx = optim.make_optimizer(W.optim_config(), params)
    state = create_state(params, tx, jax.random.key(1))
    xla = _xla_flops(make_train_step(model, tx), state, batch)
    analytic = F.step_flops(model, B_XLA, L_XLA).train
    assert XLA_BAND[0] <= analytic / xla <= XLA_BAND[1], (analytic, xla)


def test_bench_peft_step_does_not_differentiate_the_frozen_backbone():
    """The benchmark's compiled PEFT step is the training loop's (trainable mask passed): its
    XLA FLOPs match the frozen-backbone analytic count, and are well below the same step
    differentiating every parameter."""
    cell = W.Cell("adapters", "tiny", L_XLA, 2, B_XLA)
    setup = W.build_mtlx(cell, num_batches=1)
    assert setup.trainable is not None and setup.trainable_count < setup.param_count // 5
    xla = float(setup.step.lower(setup.state, setup.batches[0]).compile().cost_analysis()["flops"])
    assert XLA_BAND[0] <= setup.flops.train / xla <= XLA_BAND[1], (setup.flops.train, xla)
    from mtlx.train.step import create_state, make_train_step
    sgd = optax.sgd(0.1)
    everything = _xla_flops(make_train_step(setup.model, sgd),
                            create_state(setup.state.params, sgd, jax.random.key(0)),
                            setup.batches[0])
    assert xla < 0.85 * everything, (xla, everything)


# --------------------------------------------------------------------------- the baseline

def _faithful_setup(config, num_tasks=3, batch=4, seq=16, task=1, vocab=200):
    cell = W.Cell(config, "tiny", seq, num_tasks, batch)
    cfg = dataclasses.replace(W.backbone_config(cell), hidden_dropout=0.0, attention_dropout=0.0,
                              vocab_size=vocab)
    tasks = W.task_heads(num_tasks)
    model = MultiTaskModel(cfg, tasks, head_dropout=0.0)
    a = W.synthetic_arrays(batch, seq, vocab, 0)
    ids = np.full(batch, task) if task is not None else W.step_task_ids(0, batch, num_tasks)
    b = make_batch(task_ids=ids, **a)
    params = init_params(model, jax.random.key(0), b)
    rng = np.random.default_rng(1)  # every weight non-trivial (adapters start as identities)
    flat = {k: np.asarray(v) + (0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in tu.flatten_dict(params).items()}
    return cfg, tasks, model, a, ids, b, tu.unflatten_dict(flat)


def _baseline(config, cfg, tasks, a, ids, mode="per_task"):
    from mtlx.bench import torch_baseline as TB
    methods = W.CONFIGS[config]
    return TB.TorchBaseline(cfg, tasks, config, methods[0] if methods else {}, [a], [ids],
                            mode=mode, attention_dropout=0.0, head_dropout=0.0)


@pytest.mark.parametrize("config", ["shared", "adapters", "lora", "hyperformer++"])
def test_torch_baseline_gives_mtlx_loss_and_gradients_on_the_same_weights(config):
    from mtlx.bench import torch_baseline as TB
    cfg, tasks, model, a, ids, b, params = _faithful_setup(config)

    def loss(p):
        return H.task_losses(model.apply({"params": p}, b), b, tasks)[0][1]

    lj, gj = jax.jit(jax.value_and_grad(loss))(params)
    base = _baseline(config, cfg, tasks, a, ids)
    TB.load_mtlx_params(base, params, cfg)
    base.model.set_task("task01")
    lt = base._loss(base.batches[0])
    lt.backward()
    np.testing.assert_allclose(float(lt.detach()), float(lj), rtol=2e-5)
    m = base.model
    np.testing.assert_allclose(m.heads["task01"].weight.grad.numpy(),
                               np.asarray(gj["heads"]["task01"]["kernel"]).T, rtol=1e-3, atol=1e-6)
    root = m.base_model().encoder.layer[0]
    g0 = gj["backbone"]["layer_0"]
    if config == "adapters":
        got = root.output.adapter.adapters["task01"].down.weight.grad.numpy()
        want = np.asarray(g0["ffn"]["adapter"]["task01"]["down"]["kernel"]).T
    elif config == "lora":
        got = root.attention.self.value.lora_A["task01"].weight.grad.numpy()
        want = np.asarray(g0["attention"]["value"]["lora"]["task01"]["A"]).T
    elif config == "hyperformer++":
        got = m.hyper.generators["up_kernel"].weight.grad.numpy()
        want = np.asarray(gj["generators_hyperformer_pp"]["encoder"]["generators"]["up_kernel"]["kernel"]).T
    else:
        got = root.attention.self.query.weight.grad.numpy()
        want = np.asarray(g0["attention"]["query"]["kernel"]).T
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())


def test_split_mode_trains_the_mtlx_objective_on_the_mixed_batch():
    # Sum over tasks of each task's mean loss = mtlx's step loss (equal weights).
    from mtlx.bench import torch_baseline as TB
    from mtlx.train import optim
    from mtlx.train.step import create_state, make_train_step
    cfg, tasks, model, a, ids, b, params = _faithful_setup("adapters", num_tasks=3, batch=6, task=None)
    tx = optim.make_optimizer(W.optim_config(), params)
    _, metrics = jax.jit(make_train_step(model, tx))(create_state(params, tx, jax.random.key(0)), b)
    base = _baseline("adapters", cfg, tasks, a, ids, mode="split")
    TB.load_mtlx_params(base, params, cfg)
    base.step()
    np.testing.assert_allclose(float(base.last_loss), float(metrics["loss"]), rtol=2e-5)


def test_baseline_per_task_mode_updates_only_the_batch_task():
    cfg, tasks, model, a, ids, b, params = _faithful_setup("adapters")
    base = _baseline("adapters", cfg, tasks, a, ids)
    ad = base.model.bert.encoder.layer[0].output.adapter.adapters
    # The up-projection (zero at init) is what gets a gradient first.
    before = {t: ad[t].up.weight.detach().clone() for t in ("task00", "task01")}
    base.step()  # step 0: task00
    assert not np.allclose(before["task00"].numpy(), ad["task00"].up.weight.detach().numpy())
    np.testing.assert_array_equal(before["task01"].numpy(), ad["task01"].up.weight.detach().numpy())
    frozen = base.model.bert.encoder.layer[0].attention.self.query.weight
    assert not frozen.requires_grad


def test_baseline_errors():
    from mtlx.bench import torch_baseline as TB
    cfg, tasks, model, a, ids, b, params = _faithful_setup("shared")
    with pytest.raises(ValueError, match="mode must be one of"):
        TB.TorchBaseline(cfg, tasks, "shared", {}, [a], [ids], mode="mixed")
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16"):
        TB.TorchBaseline(cfg, tasks, "shared", {}, [a], [ids], dtype="float16")
    with pytest.raises(ValueError, match="unknown configuration 'prefix'"):
        TB.TorchBaseline(cfg, tasks, "prefix", {}, [a], [ids])


# --------------------------------------------------------------------------- peaks, memory

def test_datasheet_peaks():
    assert PK.datasheet_peak("NVIDIA H100 80GB HBM3", "bfloat16").flops_per_s == 989e12
    assert PK.datasheet_peak("NVIDIA H100 80GB HBM3", "float32").flops_per_s == 494.7e12  # TF32
    assert PK.datasheet_peak("NVIDIA H100 80GB HBM3", "float32", "highest").flops_per_s == 66.9e12
    assert PK.datasheet_peak("NVIDIA H100 PCIe", "bfloat16").flops_per_s == 756e12
    assert PK.datasheet_peak("NVIDIA H200", "bfloat16").flops_per_s == 989e12
    assert PK.datasheet_peak("NVIDIA A100-SXM4-80GB", "bfloat16").flops_per_s == 312e12
    assert PK.datasheet_peak("TPU v4", "bfloat16").flops_per_s == 275e12
    assert PK.datasheet_peak("TPU v5p", "bfloat16").flops_per_s == 459e12
    assert PK.datasheet_peak("cpu", "float32") is None
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        PK.datasheet_peak("NVIDIA H100", "float16")


def test_cpu_peak_is_measured_and_labelled():
    p = PK.device_peak("float32", measure_n=256)
    assert p.source.startswith("measured:") and p.flops_per_s > 0


def test_peak_rss_sees_an_allocation_and_compiled_bytes_are_exact():
    MEM.release_free_memory()
    with MEM.PeakRSS(interval=0.001) as m:
        start = MEM.rss_bytes()
        x = np.ones(50 * 2**20 // 8)  # 50 MiB, touched
        x += 1
    assert m.peak - start >= 40 * 2**20
    del x
    f = jax.jit(lambda a: a * 2.0)
    got = MEM.compiled_bytes(f.lower(jnp.ones((256, 256), jnp.float32)).compile())
    assert got["arguments"] == 256 * 256 * 4 and got["outputs"] == 256 * 256 * 4


# --------------------------------------------------------------------------- workload

def test_cells_and_features_validate():
    with pytest.raises(ValueError, match="unknown configuration 'prompt'"):
        W.Cell("prompt", "tiny", 128, 1, 1)
    with pytest.raises(ValueError, match="unknown size 'large'"):
        W.Cell("shared", "large", 128, 1, 1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        W.Cell("shared", "tiny", 128, 1, 0)
    with pytest.raises(ValueError, match="exceeds the tiny model's 512 positions"):
        W.Cell("shared", "tiny", 1024, 1, 1)
    with pytest.raises(ValueError, match="needs attention_dropout=0.0"):
        W.Features(attention="cudnn")
    with pytest.raises(ValueError, match="Features.dtype"):
        W.Features(dtype="float16")
    with pytest.raises(ValueError, match="unknown remat policy"):
        W.Features(remat="some")
    with pytest.raises(ValueError, match="Features.prng"):
        W.Features(prng="mt19937")


def test_task_rotation_covers_every_task():
    ids = np.concatenate([W.step_task_ids(s, 16, 64) for s in range(4)])
    assert sorted(set(ids.tolist())) == list(range(64))
    np.testing.assert_array_equal(W.step_task_ids(0, 4, 2), [0, 1, 0, 1])


def test_packing_batches_hold_the_same_examples():
    tasks, padded, packed = W.packing_batches(32, 2, 64, 1000, seed=0)
    assert padded.input_ids.shape == (32, 64) and packed.input_ids.shape[0] < 32
    assert int(padded.attention_mask.sum()) == int(packed.attention_mask.sum())
    assert int((packed.segment_ids.max(axis=1)).sum()) == 32
    # The tokens of the examples are the same multiset.
    real = lambda b: np.sort(np.asarray(b.input_ids)[np.asarray(b.attention_mask) > 0])
    np.testing.assert_array_equal(real(padded), real(packed))


def test_glue_workload_sides_hold_the_same_real_examples():
    w = W.glue_workload(8, seed=0)
    assert [t.name for t in w.tasks] == list(W.GLUE_TASKS) and w.num_examples == 48
    tokens = lambda s, r: tuple(s.input_ids[s.row_starts[r]: s.row_starts[r + 1]].tolist())
    want = sorted((t, tokens(s, r), int(s.labels[r])) for s, r, t in w.stream)
    assert want[0][1][0] == 101 and all(x[2] in (0, 1) for x in want)  # [CLS], GLUE labels
    # torch: one batch per task, padded to its longest example (or to 128).
    arrays = W.glue_torch_arrays(w, "longest")
    got = []
    for t, a in enumerate(arrays):
        lengths = a["attention_mask"].sum(1)
        assert a["input_ids"].shape == (8, lengths.max())
        got += [(t, tuple(a["input_ids"][i, :n].tolist()), int(a["labels"][i]))
                for i, n in enumerate(lengths)]
    assert sorted(got) == want
    assert all(a["input_ids"].shape == (8, 128) for a in W.glue_torch_arrays(w, "max_length"))
    # mtlx packed: every example in exactly one segment, one task a row, fixed shape.
    batches = W.glue_packed_batches(w, rows=4, max_segments=16)
    got = []
    for pb in batches:
        b, seg = pb.batch, pb.segments
        assert b.input_ids.shape == (4, 128)
        for row in range(4):
            for j in range(int(seg.mask[row].sum())):
                assert seg.task_ids[row, j] == b.task_ids[row]
                ids = b.input_ids[row][b.segment_ids[row] == j + 1]
                got.append((int(b.task_ids[row]), tuple(ids.tolist()), int(seg.labels[row, j])))
    assert sorted(got) == want
    real = sum(len(x[1]) for x in want)
    assert real == w.real_tokens and real > 0.5 * len(batches) * 4 * 128  # packing fills rows
    # Rows mixing tasks: the same examples, in no more steps.
    mixed = W.glue_packed_batches(w, rows=4, max_segments=16, mix_tasks=True)
    got = []
    for pb in mixed:
        b, seg = pb.batch, pb.segments
        assert seg.mixed and (np.asarray(b.task_ids) == -1).all()
        for row in range(4):
            for j in range(int(seg.mask[row].sum())):
                ids = b.input_ids[row][b.segment_ids[row] == j + 1]
                got.append((int(seg.task_ids[row, j]), tuple(ids.tolist()), int(seg.labels[row, j])))
    assert sorted(got) == want and len(mixed) <= len(batches)
    padded = W.glue_padded_batches(w, 8)
    assert len(padded) == 6 and sum(int(b.example_mask.sum()) for b in padded) == 48


def test_real_lengths_cell_runs_both_sides():
    opts = HR.Options(repeats=1, verbose=False, torch_threads=(1,))
    out = HR.measure_real_lengths("adapters", "tiny", 2, 2, W.Features(), opts,
                                  sides=("mtlx[packed]", "mtlx[mixed]", "torch[longest]"))
    assert set(out["ratios"]) == {"mtlx[packed]/torch[longest]", "mtlx[mixed]/torch[longest]"}
    packed, torch = out["mtlx[packed]"], out["torch[longest]"]
    mixed = out["mtlx[mixed]"]
    # Rows mixing tasks hold the same examples in no more steps, with no more padding.
    assert mixed["steps_per_pass"] <= packed["steps_per_pass"]
    assert mixed["padding_fraction"] <= packed["padding_fraction"] and mixed["examples_per_s"] > 0
    table = R.real_lengths_table({"real_lengths": out}, markdown=True)
    assert "mtlx[mixed] / side" in table and "| mtlx[mixed] |" in table
    assert packed["batch_shape"] == (2, 128) and torch["steps_per_pass"] == 6
    assert packed["examples_per_s"] > 0 and torch["examples_per_s"] > 0
    assert 0 <= packed["padding_fraction"] < 1 and torch["tokens_computed"] >= out["workload"]["real_tokens"]
    assert "torch[128]" not in out and "mtlx[128]" not in out


# --------------------------------------------------------------------------- harness, report

class _Fake:
    framework = "fake"

    def __init__(self, name, log, dt=0.0):
        self.name, self.log, self.dt = name, log, dt
        self.examples_per_step, self.tokens_per_step = 4, 64

    def step(self):
        self.log.append(self.name)

    def sync(self):
        pass


def test_interleave_takes_turns_abba():
    log = []
    runners = [_Fake("A", log), _Fake("B", log)]
    times = HR.interleave(runners, repeats=3, steps=2, rewarm=False)
    assert log == ["A", "A", "B", "B", "B", "B", "A", "A", "A", "A", "B", "B"]
    log.clear()
    HR.interleave(runners, repeats=2, steps=1)  # one untimed step before each block
    assert log == ["A", "A", "B", "B", "B", "B", "A", "A"]
    assert set(times) == {"A", "B"} and all(len(v) == 3 for v in times.values())


def test_mfu_is_recomputed_with_the_final_peak():
    peaks = HR.Peaks(HR.Options(verbose=False))
    peaks["float32"] = PK.Peak(1e10, "datasheet: x", "x", "float32")
    res = {"cells": [{"features": {"dtype": "float32"}, "mtlx": {"model_flops_per_s": 5e9, "mfu": 9.0},
                      "baseline": {"per_task": {"model_flops_per_s": 2e9, "mfu": 9.0}}}]}
    HR.recompute_mfu(res, peaks)
    assert res["cells"][0]["mtlx"]["mfu"] == 0.5 and res["cells"][0]["baseline"]["per_task"]["mfu"] == 0.2


def test_figures_and_task_scaling():
    fig = HR.figures(_Fake("A", []), [0.5, 0.25, 1.0], flops_per_step=1e9, peak=1e10)
    assert fig["step_s"] == 0.5 and fig["examples_per_s"] == 8 and fig["tokens_per_s"] == 128
    assert math.isclose(fig["mfu"], 0.2)
    rows = [{"config": "adapters", "size": "tiny", "seq_len": 128, "batch_size": 16,
             "features": {}, "num_tasks": t, "mtlx": {"step_s": s},
             "baseline": {"per_task": {"step_s": 1.0}}} for t, s in ((1, 0.1), (8, 0.105), (64, 0.12))]
    (s,) = HR.task_scaling(rows)
    assert s["reference_tasks"] == 1
    assert math.isclose(s["mtlx"][64], 1.2) and math.isclose(s["baseline"]["per_task"][8], 1.0)
    groups = HR.group_by_tasks(W.grid([("lora", "tiny", 128, 1, 4), ("shared", "tiny", 128, 1, 4),
                                       ("lora", "tiny", 128, 8, 4)]))
    assert [[c.num_tasks for c in g] for g in groups] == [[1, 8], [1]]


def test_feature_variants_say_what_is_unavailable():
    v = HR.feature_variants(W.Features(), "cpu")
    assert v["reference"] == W.Features()
    assert v["dtype=bfloat16"].dtype == "bfloat16"
    assert v["remat=full"].remat == "full" and v["donate=off"].donate is False
    assert "not available on cpu" in v["attention=cudnn (attention_dropout=0)"]
    assert v["scan_layers=on"].scan_layers is True and v["reference"].scan_layers is False
    assert v["prng=rbg (dropout random bits)"].prng == "rbg"
    # bf16 products: the other precision policy, in bf16 (CPU: XLA's plain bf16 products)
    assert v["dtype=bfloat16, dots=native"] == W.Features(dtype="bfloat16", dots="native")
    vb = HR.feature_variants(W.Features(dtype="bfloat16"), "cpu")
    assert vb["dots=native"] == W.Features(dtype="bfloat16", dots="native")
    assert HR.feature_variants(W.Features(dtype="bfloat16"), "gpu")["dots=f32_accumulate"].dots \
        == "f32_accumulate"
    with pytest.raises(ValueError, match="Features.dots"):
        W.Features(dots="fast")
    # a frozen backbone in bf16: its kernels stored in bf16 (config.model.frozen_dtype)
    vf = HR.feature_variants(W.Features(dtype="bfloat16"), "cpu", frozen=True)
    assert vf["frozen kernels bfloat16"].frozen_dtype == "bfloat16"
    assert "frozen kernels bfloat16" not in vb and "frozen kernels bfloat16" not in \
        HR.feature_variants(W.Features(), "cpu", frozen=True)
    assert HR.feature_variants(W.Features(dtype="bfloat16", frozen_dtype="bfloat16"), "cpu",
                               frozen=True)["dtype=float32"].frozen_dtype is None
    with pytest.raises(ValueError, match="Features.frozen_dtype"):
        W.Features(frozen_dtype="bfloat16")
    short = HR.feature_variants(W.Features(), "cpu", short=True)
    assert "dtype=bfloat16, dots=native" in short
    assert not any(k.startswith("remat") for k in short)                  # --quick on a CPU
    gpu_short = HR.feature_variants(W.Features(), "gpu", short=True)
    assert "remat=dots" in gpu_short and "remat=full" not in gpu_short
    assert "scan_layers=on" not in short and "donate=off" not in short   # --quick on a CPU
    assert not any(k.startswith(("prng", "attention_dropout", "activation_vjp")) for k in short)
    # GELU's gradient: 'auto' (the saved input) against autodiff (a GPU question)
    assert v["activation_vjp=autodiff"].activation_vjp == "autodiff"
    assert HR.feature_variants(W.Features(), "gpu", short=True)[
        "activation_vjp=autodiff"].activation_vjp == "autodiff"
    with pytest.raises(ValueError, match="Features.activation_vjp"):
        W.Features(activation_vjp="remat")
    assert v["dropout_draws=bernoulli"].dropout_draws == "bernoulli"
    assert "dropout_draws=bernoulli" in HR.feature_variants(W.Features(), "gpu", short=True)
    assert not any(k.startswith("dropout_draws") for k in short)
    with pytest.raises(ValueError, match="Features.dropout_draws"):
        W.Features(dropout_draws="philox")
    # the gather's gradient: in a routed cell, the platform's 'auto' against the other choice
    assert HR.feature_variants(W.Features(), "cpu", routed=True)["gather_grad=onehot"].gather_grad == "onehot"
    assert HR.feature_variants(W.Features(), "gpu", short=True, routed=True)[
        "gather_grad=scatter"].gather_grad == "scatter"
    assert not any(k.startswith("gather_grad") for k in v)      # not routed
    assert not any(k.startswith("gather_grad")
                   for k in HR.feature_variants(W.Features(routing="onehot"), "gpu", routed=True))
    with pytest.raises(ValueError, match="Features.gather_grad"):
        W.Features(gather_grad="atomic")
    # BERT's residual LayerNorm gradient: saved inputs (the default) against autodiff
    assert v["layer_norm_vjp=autodiff"].layer_norm_vjp == "autodiff"
    assert HR.feature_variants(W.Features(), "gpu", short=True)[
        "layer_norm_vjp=autodiff"].layer_norm_vjp == "autodiff"
    assert not any(k.startswith("layer_norm_vjp") for k in short)
    with pytest.raises(ValueError, match="Features.layer_norm_vjp"):
        W.Features(layer_norm_vjp="fused")
    # the grouped global gradient norm against optax's (a kernel-count question: routed cells)
    assert v["grad_norm=per_leaf"].grad_norm == "per_leaf"
    assert "grad_norm=per_leaf" in HR.feature_variants(W.Features(), "gpu", short=True, routed=True)
    assert "grad_norm=per_leaf" not in HR.feature_variants(W.Features(), "gpu", short=True)
    with pytest.raises(ValueError, match="Features.grad_norm"):
        W.Features(grad_norm="flat")
    # command-line text typed like the field (profile_step's overrides, ab_features' sides)
    f = W.Features()
    assert W.feature_value(f, "donate", "off") is False and W.feature_value(f, "scan_layers", "on") is True
    assert W.feature_value(f, "hidden_dropout", "0") == 0.0
    assert W.feature_value(f, "routing", "onehot") == "onehot" and W.feature_value(f, "routing", "none") is None
    g = HR.feature_variants(W.Features(), "gpu")
    assert g["attention=cudnn (attention_dropout=0)"].attention == "cudnn"
    gs = HR.feature_variants(W.Features(), "gpu", short=True)
    assert "attention_dropout=0" in gs and "prng=rbg (dropout random bits)" in gs
    assert "scan_layers=on" in gs and "donate=off" in gs
    assert not any(k.startswith("routing") for k in v)
    routed = list(HR.feature_variants(W.Features(), "gpu", routed=True))
    assert routed[1:3] == ["routing=ragged", "routing=onehot"]   # first after the reference
    assert [k for k in HR.feature_variants(W.Features(), "gpu", short=True, routed=True)
            if k.startswith("routing")] == ["routing=onehot"]


def test_routing_feature_reaches_every_method():
    cell = W.Cell("adapters", "tiny", 16, 4, 2, W.Features(routing="onehot"))
    cfg = W.backbone_config(cell)
    assert cfg.extensions and all(e.impl == "onehot" for e in cfg.extensions)
    plain = W.backbone_config(W.Cell("adapters", "tiny", 16, 4, 2))
    assert all(e.impl == "gather" for e in plain.extensions)
    with pytest.raises(ValueError, match="Features.routing"):
        W.Features(routing="loop")


def _fake_results():
    cells = []
    for t, ms in ((1, 10.0), (8, 10.5), (64, 11.0)):
        side = {"examples_per_s": 16 / (ms / 1e3), "tokens_per_s": 2048 / (ms / 1e3),
                "model_flops_per_s": 1e11, "mfu": 0.4, "compile_s": 3.0, "compilations": 1,
                "step_s": ms / 1e3, "memory": {"rss_delta": 2**27}}
        base = dict(side, examples_per_s=side["examples_per_s"] / 2, mfu=0.2)
        cells.append({"cell": f"adapters/tiny/L128/T{t}/B16", "config": "adapters", "size": "tiny",
                      "seq_len": 128, "num_tasks": t, "batch_size": 16,
                      "features": dataclasses.asdict(W.Features()), "mtlx": side,
                      "baseline": {"per_task": base}, "ratio": {"per_task": 2.0}})
    res = {"environment": {"device_kind": "cpu", "jax_backend": "cpu"}, "cells": cells,
           "peaks": {"float32": {"flops_per_s": 5e10, "source": "measured: x"}},
           "command": "python scripts/bench.py --quick"}
    res["task_scaling"] = HR.task_scaling(cells)
    return res


def test_report_tables_and_plot(tmp_path):
    res = _fake_results()
    text = R.render(res)
    assert "2.00x" in text and "adapters" in text and "1.100x" in text
    md = R.render(res, markdown=True)
    assert "| config | size |" in md and "`python scripts/bench.py --quick`" in md
    path = R.plot_tasks(res, str(tmp_path / "tasks.png"))
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    one = dict(res, cells=res["cells"][:1])
    assert R.plot_tasks(one, str(tmp_path / "none.png")) is None


def test_goals_table_reads_each_goal_from_its_cells():
    res = _fake_results()    # tiny adapters, 64 tasks 1.1x the 1-task step: at the goal's edge
    base = dict(res["cells"][1], config="adapters", size="base", num_tasks=8, batch_size=4,
                ratio={"per_task": 1.55})
    res["cells"].append(base)
    rows = [l for l in R.goals_table(res).splitlines()[2:]]
    cpu = [l for l in rows if l.lstrip().startswith("CPU")]
    assert len(cpu) == 1 and "adapters/base/L128/T8/B4/fp32" in cpu[0] and "1.550x" in cpu[0]
    assert cpu[0].rstrip().endswith("NOT met")
    (scaling,) = [l for l in rows if "task scaling" in l]
    assert "adapters/tiny/L128/B16" in scaling and "1.100x" in scaling
    assert scaling.rstrip().endswith("met") and "NOT" not in scaling   # 1.1 <= 1.10
    assert sum("not measurable on cpu" in l for l in rows) == 2       # the GPU goals
    # on a GPU: the shared BERT-base bf16 cell's MFU and ratio
    gpu = dict(res, environment={"jax_backend": "gpu"}, task_scaling=[])
    shared = dict(base, config="shared", features=dict(base["features"], dtype="bfloat16"),
                  mtlx=dict(base["mtlx"], mfu=0.289), ratio={"per_task": 2.3})
    gpu["cells"] = [shared]
    text = R.goals_table(gpu)
    assert "28.9%" in text and "2.30x" in text and "CPU" not in text
    (mfu,) = [l for l in text.splitlines() if "MFU" in l]
    assert mfu.rstrip().endswith("NOT met")
    assert "goals (issue #7" in R.render(res)


# --------------------------------------------------------------------------- heavy: end to end

@pytest.mark.heavy
def test_quick_harness_path_end_to_end(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import bench
    out = tmp_path / "bench.json"
    notes = tmp_path / "NOTES.md"
    notes.write_text(f"# log\nbefore\n{bench.NOTES_BEGIN}\nold table\n{bench.NOTES_END}\nafter\n")
    res = bench.main(["--cells", "adapters/tiny/32/1/4;adapters/tiny/32/4/4", "--repeats", "2",
                      "--block-seconds", "0.05", "--features", "adapters/tiny/32/4/4",
                      "--packing", "adapters/tiny/32/16/2", "--real-lengths", "adapters/tiny/4/4",
                      "--compile-cache-check", "adapters/tiny/32/4/4", "--checks",
                      "--baseline-modes", "per_task,split",
                      "--json", str(out), "--plot", str(tmp_path / "t.png"),
                      "--markdown", str(tmp_path / "t.md"), "--notes", str(notes), "--quiet"])
    saved = json.loads(out.read_text())
    assert len(saved["cells"]) == 2
    for cell in saved["cells"]:
        assert cell["mtlx"]["compilations"] == 1 and cell["compilations_during_timing"] == 0
        assert set(cell["baseline"]) == {"per_task", "split"} and cell["ratio"]["per_task"] > 0
        assert cell["mtlx"]["mfu"] > 0 and cell["mtlx"]["memory"]["compiled"]["total"] > 0
    assert saved["task_scaling"][0]["reference_tasks"] == 1
    scan = saved["features"]["variants"]["scan_layers=on"]
    assert scan["available"] is True and scan["features"]["scan_layers"] is True, scan
    assert saved["packing"]["packed"]["rows"] < saved["packing"]["padded"]["rows"]
    assert saved["compile_cache"]["warm"]["cache_hits"] >= 1
    real = saved["real_lengths"]
    assert set(real["ratios"]) == {f"{m}/{t}" for m in ("mtlx[packed]", "mtlx[mixed]", "mtlx[128]")
                                   for t in ("torch[longest]", "torch[128]")}
    assert real["mtlx[packed]"]["tokens_computed"] < real["mtlx[128]"]["tokens_computed"]
    assert real["mtlx[mixed]"]["tokens_computed"] <= real["mtlx[packed]"]["tokens_computed"]
    assert {c["status"] for c in saved["checks"]} <= {"pass", "skipped"}
    assert (tmp_path / "t.png").exists() and "| config |" in (tmp_path / "t.md").read_text()
    assert res["wall_s"] > 0
    text = notes.read_text()      # the block replaced, the rest kept
    assert text.startswith("# log\nbefore\n") and text.endswith(f"{bench.NOTES_END}\nafter\n")
    assert "old table" not in text and "| adapters | tiny | 32 | 4 | 4 |" in text
    assert "t.png" in text and "phase_seconds" in saved and "real GLUE lengths" in text


def test_bench_notes_markers_are_checked_before_measuring(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import bench
    notes = tmp_path / "NOTES.md"
    notes.write_text("no markers here\n")
    with pytest.raises(SystemExit, match=r"NOTES.md needs exactly one line"):
        bench.main(["--cells", "adapters/tiny/32/1/4", "--notes", str(notes), "--quiet"])
    with pytest.raises(SystemExit, match="cannot read"):
        bench.main(["--cells", "adapters/tiny/32/1/4", "--notes", str(tmp_path / "x.md")])


def test_profile_step_script_sums_op_kinds(capsys, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import profile_step
    profile_step.main(["--cell", "shared/tiny/16/2/2", "--cell", "shared/tiny/16/2/2:prng=rbg,hidden_dropout=0",
                       "--steps", "1", "--top", "5", "--hlo-dir", str(tmp_path)])
    out = capsys.readouterr().out
    first, second = out.split("\nshared/tiny/16/2/2:prng=rbg,hidden_dropout=0 (")[0], out
    assert "shared/tiny/16/2/2 (float32, attention=default" in first and "1 traced steps:" in first
    assert "ms untraced" in first and "op kind" in first
    rows = [l for l in first.splitlines() if l.endswith(tuple("0123456789")) and "%" in l]
    assert 1 <= len(rows) <= 5
    # the second variant's Features overrides reached its step, and the summary compares both
    assert "prng=rbg" in second and "hidden_dropout=0.0" in second
    summary = out.split("\nsummary")[1].splitlines()
    assert summary[1].split()[0] == "shared/tiny/16/2/2" and "1.000x" in summary[1]
    assert summary[2].split()[0] == "shared/tiny/16/2/2:prng=rbg,hidden_dropout=0"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shared_tiny_16_2_2.hlo.txt.gz", "shared_tiny_16_2_2_prng_rbg_hidden_dropout_0.hlo.txt.gz"]
    with pytest.raises(SystemExit, match="must be config/size/L/T/B"):
        profile_step.main(["--cell", "shared/tiny/16"])
    with pytest.raises(SystemExit, match="unknown feature 'speed'"):
        profile_step.main(["--cell", "shared/tiny/16/2/2:speed=2"])


def test_a_run_stopped_after_a_phase_leaves_the_finished_figures_in_json(tmp_path, monkeypatch):
    """A GPU lease can kill the run at its time limit: each finished phase is already in --json
    (marked partial)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import bench
    from mtlx.bench import harness as HR

    def stop(*a, **k):
        raise KeyboardInterrupt("time limit")

    monkeypatch.setattr(HR, "measure_packing", stop)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--cells", "shared/tiny/16/1/2", "--repeats", "1", "--block-seconds", "0.01",
                    "--baseline-modes", "none", "--features", "none",
                    "--packing", "shared/tiny/16/8/2", "--real-lengths", "none",
                    "--compile-cache-check", "none", "--json", str(out),
                    "--markdown", str(tmp_path / "bench.md"), "--quiet"])
    saved = json.loads(out.read_text())
    assert saved["partial"] is True
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("machine:") and "PARTIAL" in md and "| shared | tiny | 16 | 1 | 2 |" in md
    assert [c["cell"] for c in saved["cells"]] == ["shared/tiny/L16/T1/B2"]
    assert saved["cells"][0]["mtlx"]["examples_per_s"] > 0
    assert "packing" in saved["phase_seconds"] and "packing" not in saved


def test_correctness_checks_pass_on_padded_rows_and_catch_a_wrong_model(monkeypatch):
    from mtlx.bench import checks
    seen = {}
    real_ref = checks._torch_reference

    def ref(cell, cfg, tasks, arrays, params, device):
        seen["mask"] = arrays["attention_mask"]
        return real_ref(cell, cfg, tasks, arrays, params, device)

    monkeypatch.setattr(checks, "_torch_reference", ref)
    out = checks.run_checks(seq_len=32, batch=3)
    assert [c["status"] for c in out] == ["pass", "pass", "skipped"], out
    assert sorted(seen["mask"].sum(-1)) == [8, 20, 32]      # right-padded rows, three lengths

    def wrong(*a, **k):
        loss, logits = real_ref(*a, **k)
        return loss, logits + 1.0
    monkeypatch.setattr(checks, "_torch_reference", wrong)
    out = checks.run_checks(seq_len=32, batch=3)
    assert [c["status"] for c in out[:2]] == ["fail", "fail"]
    assert checks.summary(out) == {"pass": 0, "fail": 2, "skipped": 1}


def test_a_spent_time_budget_stops_building_runners(monkeypatch):
    """Past opts.deadline, a group keeps the cells it built and a features phase the variants
    it built; the rest are skipped, not built."""
    import time as _time
    built = []
    real_build = HR._build_mtlx_runner

    def build(cell, opts, name):
        built.append(name)
        return real_build(cell, opts, name)

    monkeypatch.setattr(HR, "_build_mtlx_runner", build)
    opts = HR.Options(repeats=1, block_seconds=0.01, verbose=False, baseline_modes=(),
                      deadline=_time.perf_counter() - 1)
    peaks = HR.Peaks(opts)
    peaks["float32"] = PK.Peak(1e10, "datasheet: x", "x", "float32")
    cells = [W.Cell("shared", "tiny", 16, t, 2) for t in (1, 2)]
    res = HR.measure_group(cells, opts, peaks)
    assert [r["cell"] for r in res] == [cells[0].label] and len(built) == 1
    out = HR.measure_features(cells[0], opts, peaks, short=True)["variants"]
    assert out["reference"]["available"] is True
    skipped = [k for k, v in out.items() if v.get("reason") == "skipped: time budget spent"]
    assert skipped and all(k != "reference" for k in skipped) and len(built) == 2


def test_threads_probe_times_only_the_faster_setting():
    """--quick (Options.torch_threads_probe): each thread setting takes one probe step after
    its build, and only the faster one is timed; the probe's seconds are in the results."""
    opts = HR.Options(repeats=1, block_seconds=0.01, verbose=False, torch_threads=(1, 2),
                      torch_threads_probe=True)
    peaks = HR.Peaks(opts)
    peaks["float32"] = PK.Peak(1e10, "datasheet: x", "x", "float32")
    res = HR.measure_group([W.Cell("shared", "tiny", 16, 1, 2)], opts, peaks)[0]
    (timed_threads,) = res["baseline_by_threads"]["per_task"]          # one setting timed
    probe = res["baseline"]["per_task"]["threads_probe_step_s"]
    assert set(probe) == {"1", "2"} and all(v > 0 for v in probe.values())
    assert timed_threads == min(probe, key=probe.get)
    assert res["ratio"]["per_task"] > 0


def test_hlo_traffic_counts_operands_and_results(tmp_path, capsys):
    # One fused elementwise op over two f32[1000] operands: 8,000 bytes read, 4,000 written.
    import gzip
    import jax
    import jax.numpy as jnp
    sys.path.insert(0, str(REPO / "scripts"))
    import hlo_traffic
    text = jax.jit(lambda x, y: x * y + 1.0).lower(jnp.ones(1000), jnp.ones(1000)).compile().as_text()
    path = tmp_path / "step.hlo.txt.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    ops = hlo_traffic.entry_ops(text)
    assert sum(o[3] for o in ops) == 8000 and sum(o[4] for o in ops) == 4000
    assert hlo_traffic.array_bytes("(bf16[2,3]{1,0}, pred[4], s8[8])") == 12 + 4 + 8
    agg = hlo_traffic.main([str(path), "--top", "3"])
    assert sum(a[1] + a[2] for a in agg.values()) == 12000
    assert "0.00 GB read + written" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no ENTRY computation"):
        hlo_traffic.entry_ops("HloModule m\n")


def test_ab_features_script_times_one_switch(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import ab_features
    ratio = ab_features.main(["dropout_draws", "hash16", "bernoulli", "--cell",
                              "shared/tiny/16/2/2:optimizer=adafactor", "--dtype", "float32",
                              "--repeats", "1", "--block-seconds", "0.01"])
    out = capsys.readouterr().out
    assert ratio > 0 and "dropout_draws: hash16 vs bernoulli" in out
    assert "hash16" in out and "bernoulli / hash16 (median step time)" in out
    # the cell's own overrides reach both sides, and each side's compile time is printed
    assert "optimizer=adafactor" in out and out.count("compiled in") == 2
    with pytest.raises(SystemExit, match="unknown feature 'speed'"):
        ab_features.main(["donate", "on", "off", "--cell", "shared/tiny/16/2/2:speed=2"])
    with pytest.raises(SystemExit, match="unknown Features field 'speed'"):
        ab_features.main(["speed", "1", "2", "--cell", "shared/tiny/16/2/2"])


def test_gather_grad_feature_reaches_the_step():
    """Features.gather_grad is traced into the cell's step: 'onehot' sums the gathered adapter
    weights' gradients without a scatter, 'auto' on a CPU keeps autodiff's scatter-add."""
    def ops(grad):
        cell = W.Cell("adapters", "tiny", 16, 4, 4, W.Features(gather_grad=grad))
        setup = W.build_mtlx(cell, num_batches=1)
        text = setup.step.lower(setup.state, setup.batches[0]).as_text()
        # (jnp.take's lowering is a private function shared by its calls: its scatter-add
        # appears once a signature; other scatters, e.g. the loss's, stay in both)
        return text.count('stablehlo.scatter"'), text.count("stablehlo.dot_general")
    (scatters_auto, dots_auto), (scatters_onehot, dots_onehot) = ops("auto"), ops("onehot")
    assert scatters_onehot < scatters_auto
    # 2 layers x 2 adapter sites x (down, up) x (kernel, bias): one contraction each
    assert dots_onehot - dots_auto == 16


def test_quick_keeps_a_time_budget_under_five_minutes():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench
    assert bench.time_budget(None, None) is None
    assert bench.time_budget(100.0, bench.QUICK) == 100.0          # --time-budget wins
    assert 0 < bench.time_budget(None, bench.QUICK) < 300            # --quick's own
    # the CPU goal's cell runs first, so a spent budget skips tiny cells before it
    assert bench.QUICK["cells"][0] == ("adapters", "base", 128, 8, 4)


def test_features_choices_mirror_the_switches_they_set():
    """mtlx.bench.workload keeps its own copies of the switches' choices (it imports no jax at
    module level): they must stay the modules' own."""
    from mtlx.models import activations, dropout, norms
    from mtlx.peft import routing
    from mtlx.train import optim, stacking
    assert W.OPTIMIZERS == optim.OPTIMIZERS and W.GRAD_NORMS == optim.GRAD_NORMS
    assert W.STACK_STATES == stacking.SETTINGS and W.GATHER_GRADS == routing.GATHER_GRADS
    assert W.ACTIVATION_VJPS == activations.POLICIES and W.DROPOUT_DRAWS == dropout.POLICIES
    assert W.LAYER_NORM_VJPS == norms.POLICIES
