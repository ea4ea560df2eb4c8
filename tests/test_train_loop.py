"""The training loop end to end on the embedded sample: outputs, exact resume, bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtlx.train.checkpoint import CheckpointMismatchError, Checkpointer
from mtlx.train.config import ConfigError, apply_overrides, load_config
from mtlx.train.loop import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.py")


def local_cfg(*overrides):
    cfg = load_config(DEMO + ":local")
    cfg.tasks = ("cola", "stsb", "ud_pos")
    cfg.model.hidden_dropout = 0.0
    return apply_overrides(cfg, list(overrides))


def preempt_at(n):
    """An on_step callback that sends this process SIGTERM (a preemption) at step n."""
    def on_step(step):
        if step == n:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_step


def leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    results, state = train_and_evaluate(local_cfg(), wd, progress=False, return_state=True)
    return wd, results, state


def test_run_writes_results_logs_plots(uninterrupted):
    wd, results, _ = uninterrupted
    saved = json.loads((wd / "eval_results.json").read_text())
    assert set(saved) == {"cola", "stsb", "ud_pos"}
    assert {"mcc", "loss"} <= set(saved["cola"]) and {"pearson", "spearman"} <= set(saved["stsb"])
    assert "token_accuracy" in saved["ud_pos"]
    assert saved == json.loads(json.dumps(results))
    assert (wd / "plots" / "loss_curves.png").stat().st_size > 1000
    assert (wd / "plots" / "metric_curves.png").stat().st_size > 1000
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
    assert any(l["kind"] == "eval" and "eval/cola/mcc" in l for l in lines)
    info = [l for l in lines if l["kind"] == "info"]
    assert info and info[-1]["compile/train_step_executables"] <= 2  # one per length bucket
    train = [l for l in lines if "perf/examples_per_s" in l]
    batch = local_cfg().batch_size  # unpacked: an example a row
    assert train and all(l["perf/examples_per_s"] / l["perf/steps_per_s"] == pytest.approx(batch)
                         for l in train)


def test_stacked_state_run_checkpoints_by_name_and_resumes_unstacked(uninterrupted, tmp_path):
    """config.stack_state='on' (mtlx.train.stacking): the step takes the state's small leaves
    stacked; its checkpoint is the name-keyed state, which an unstacked run resumes from."""
    wd, results, full_state = uninterrupted
    cfg = local_cfg("--config.checkpoint.every=100", "--config.stack_state=on")
    _, first = train_and_evaluate(cfg, tmp_path, progress=False, on_step=preempt_at(3), return_state=True)
    assert int(first.step) == 3 and type(first) is type(full_state)
    info = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    info = [l for l in info if l["kind"] == "info"][-1]
    assert info["compile/train_step_state_arrays"] < info["compile/train_step_state_leaves"] / 2
    plain = local_cfg("--config.checkpoint.every=100", "--config.stack_state=off")
    res2, resumed = train_and_evaluate(plain, tmp_path, progress=False, return_state=True)
    assert int(resumed.step) == int(full_state.step) == 6
    # Steps 1-3 compiled with stacking, 4-6 without: equal up to float32 rounding.
    for a, b in zip(leaves(resumed), leaves(full_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for task, metrics in results.items():
        for k, v in metrics.items():
            assert res2[task][k] == pytest.approx(v, rel=1e-3, abs=1e-4), (task, k)


def preempted_and_resumed(workdir):
    """The local run preempted (SIGTERM) at step 3 in `workdir`, then run again to its end:
    (results, final state) of the second run."""
    cfg = local_cfg("--config.checkpoint.every=100")  # only the preemption save happens
    _, first = train_and_evaluate(cfg, workdir, progress=False, on_step=preempt_at(3), return_state=True)
    assert int(first.step) == 3
    return train_and_evaluate(cfg, workdir, progress=False, return_state=True)


def test_preempted_run_resumes_bit_identical(uninterrupted, tmp_path):
    _, _, full_state = uninterrupted
    _, resumed = preempted_and_resumed(tmp_path)
    assert int(resumed.step) == int(full_state.step) == 6
    for a, b in zip(leaves(resumed), leaves(full_state)):
        np.testing.assert_array_equal(a, b)


def test_preempted_at_an_evaluation_step_saves_without_evaluating(tmp_path):
    """A grace period after SIGTERM is short: the step is saved at once, not evaluated first
    (the resumed run evaluates at its next evaluation step)."""
    cfg = local_cfg("--config.eval_every=3", "--config.checkpoint.every=100")
    results = train_and_evaluate(cfg, tmp_path, progress=False, on_step=preempt_at(3))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert results == {} and not [l for l in lines if l["kind"] == "eval"]
    ckpt = Checkpointer(tmp_path / "checkpoints", tasks=["cola", "stsb", "ud_pos"], model_signature={})
    assert ckpt.all_steps() == [3]
    ckpt.close()
    results = train_and_evaluate(cfg, tmp_path, progress=False)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(results) == {"cola", "stsb", "ud_pos"}
    assert [l["step"] for l in lines if l["kind"] == "eval"] == [6]


def test_a_failing_checkpoint_close_still_restores_the_signal_handlers(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    real_close = Checkpointer.close

    def close(self):
        real_close(self)
        raise RuntimeError("the last save failed")
    monkeypatch.setattr(Checkpointer, "close", close)
    with pytest.raises(RuntimeError, match="the last save failed"):
        train_and_evaluate(local_cfg("--config.optim.num_train_steps=2"), tmp_path, progress=False)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_peft_run_takes_a_new_task(tmp_path):
    """Adapters keep a copy of the task list, which was part of the checkpoint's signature:
    adding a task to any PEFT run was refused even with allow_new_tasks."""
    adapters = str(ROOT / "configs" / "glue_adapters.py") + ":local"
    base = ["--config.optim.num_train_steps=2", "--config.eval_every=2"]
    first = train_and_evaluate(apply_overrides(load_config(adapters), base + [
        "--config.tasks=('cola','sst2')"]), tmp_path, progress=False)
    # the same steps: nothing more is trained, so the old tasks score as they did
    again = train_and_evaluate(apply_overrides(load_config(adapters), base + [
        "--config.tasks=('cola','sst2','stsb')", "--config.allow_new_tasks=True"]),
        tmp_path, progress=False)
    assert set(again) == {"cola", "sst2", "stsb"}
    for task in ("cola", "sst2"):
        assert again[task] == pytest.approx(first[task], rel=1e-6, abs=1e-7)


def test_workdir_of_another_task_set(uninterrupted, tmp_path):
    wd, _, _ = uninterrupted
    import shutil
    shutil.copytree(wd / "checkpoints", tmp_path / "checkpoints")
    cfg = local_cfg("--config.tasks=cola,stsb,ud_pos,sst2")
    with pytest.raises(CheckpointMismatchError, match="sst2"):
        train_and_evaluate(cfg, tmp_path, progress=False)
    cfg = local_cfg("--config.tasks=cola,stsb,ud_pos,sst2", "--config.allow_new_tasks=True",
                    "--config.optim.num_train_steps=8")
    results = train_and_evaluate(cfg, tmp_path, progress=False)
    assert set(results) == {"cola", "stsb", "ud_pos", "sst2"}


def test_nan_loss_stops_naming_step_and_task_and_keeps_last_good_checkpoint(tmp_path):
    cfg = local_cfg("--config.optim.optimizer=sgd", "--config.optim.learning_rate=1e30",
                    "--config.optim.grad_clip_norm=None", "--config.optim.warmup_steps=0",
                    "--config.checkpoint.every=1", "--config.optim.num_train_steps=6")
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+: tasks \[") as e:
        train_and_evaluate(cfg, tmp_path, progress=False)
    ckpt = Checkpointer(tmp_path / "checkpoints", tasks=["cola", "stsb", "ud_pos"], model_signature={})
    bad_step = int(str(e.value).split("step ")[1].split(":")[0])
    assert all(s <= bad_step for s in ckpt.all_steps())  # nothing saved after the bad step
    ckpt.close()


def test_config_errors():
    cfg = load_config(DEMO)
    with pytest.raises(ConfigError, match=r"unknown config key 'config.optim.learnig_rate'; did you mean config.optim.learning_rate"):
        apply_overrides(cfg, ["--config.optim.learnig_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"--config.batch_size: expected int .*'many'"):
        apply_overrides(cfg, ["--config.batch_size=many"])
    with pytest.raises(ConfigError, match=r"config.optim is a group"):
        apply_overrides(cfg, ["--config.optim=3"])
    apply_overrides(cfg, ["--config.optim.learning_rate", "3e-4", "--config.data.buckets=16,32"])
    assert cfg.optim.learning_rate == 3e-4 and cfg.data.buckets == (16, 32)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.py")


def test_execution_options_restore_the_same_checkpoint(uninterrupted):
    """config.model.scan_layers / remat reach the encoder, are not part of the checkpoint
    signature, and a run with them restores (and evaluates identically) the plain run's
    checkpoint; T5 takes them too, a backbone without such a field refuses them naming the key."""
    from mtlx.train import loop as LP
    wd, _, state = uninterrupted
    cfg = local_cfg("--config.model.scan_layers=True", "--config.model.remat=dots")
    s = LP.setup(cfg, train=False)
    assert s.backbone_cfg.scan_layers and s.backbone_cfg.remat == "dots"
    assert not set(LP.signature_of(s.backbone_cfg)) & set(LP.EXECUTION_FIELDS)
    r = s.checkpointer(wd, read_only=True).restore_latest(s.state)
    assert r is not None
    np.testing.assert_array_equal(np.concatenate([x.ravel() for x in leaves(r.state)]),
                                  np.concatenate([x.ravel() for x in leaves(state)]))
    plain = LP.setup(local_cfg(), train=False)
    batch = plain.init_batch
    a = plain.model.apply({"params": r.state.params}, batch)
    b = s.model.apply({"params": r.state.params}, batch)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    t5 = local_cfg("--config.model.scan_layers=True")
    t5.model.family = "t5"
    t5.model.config = dict(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    assert LP.build_backbone(t5)[0].scan_layers      # T5 scans its layers 1.. too
    t5.model.scan_layers, t5.model.remat = False, "full"
    assert LP.build_backbone(t5)[0].remat == "full"
    import dataclasses
    import ml_collections

    @dataclasses.dataclass(frozen=True)
    class NoSwitches:
        hidden: int = 4
    with pytest.raises(ValueError, match=r"config.model.scan_layers=True: this model's config "
                                         r"\(NoSwitches\) has no such option"):
        LP.with_execution_switches(NoSwitches(), ml_collections.ConfigDict({"scan_layers": True}))


def test_packed_training_runs_resumes_and_evaluates(tmp_path):
    """config.data.packing: the loop trains on packed rows (several examples of one task a row,
    one compiled step), evaluates unpacked, and a preempted packed run resumes bit-identically."""
    from mtlx.data.packing import PackedBatch, PackedIterator
    from mtlx.train import loop as LP
    cfg = local_cfg("--config.data.packing=True", "--config.data.packing_max_segments=4")
    s = LP.setup(cfg)
    assert isinstance(s.iterator, PackedIterator) and isinstance(s.init_batch, PackedBatch)
    assert int(np.asarray(s.init_batch.segments.mask).sum()) > cfg.batch_size  # really packed
    full_wd = tmp_path / "full"
    results, full = train_and_evaluate(cfg, full_wd, progress=False, return_state=True)
    assert set(results) == {"cola", "stsb", "ud_pos"}
    assert np.isfinite(results["stsb"]["loss"]) and "token_accuracy" in results["ud_pos"]
    lines = [json.loads(l) for l in (full_wd / "metrics.jsonl").read_text().splitlines()]
    info = [l for l in lines if l["kind"] == "info"]
    assert info[-1]["compile/train_step_executables"] == 1     # one row length: one program
    # perf/examples_per_s counts the examples in the packed rows, not the rows.
    train = [l for l in lines if "perf/examples_per_s" in l]
    assert train
    for a, b in zip([{"step": 0}] + train, train):
        segs = [int(np.asarray(s.iterator.batch_at(k).segments.mask).sum())
                for k in range(a["step"], b["step"])]
        assert b["perf/examples_per_s"] / b["perf/steps_per_s"] == pytest.approx(np.mean(segs))
        assert np.mean(segs) > cfg.batch_size


    wd = tmp_path / "preempted"
    train_and_evaluate(cfg, wd, progress=False, on_step=preempt_at(3))
    _, resumed = train_and_evaluate(cfg, wd, progress=False, return_state=True)
    for a, b in zip(leaves(resumed), leaves(full)):
        np.testing.assert_array_equal(a, b)
    # The T5 encoder trains packed rows too (segment ids + per-segment relative positions).
    t5 = local_cfg("--config.data.packing=True", "--config.data.packing_max_segments=4",
                   "--config.optim.num_train_steps=3", "--config.eval_every=3",
                   "--config.checkpoint.every=3")
    t5.model.family = "t5"
    t5.model.config = dict(vocab_size=30522, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                           num_heads=2)
    s = LP.setup(t5)
    assert isinstance(s.init_batch, PackedBatch) and s.backbone_cfg.model_type == "t5"
    results = train_and_evaluate(t5, tmp_path / "t5", progress=False)
    assert set(results) == {"cola", "stsb", "ud_pos"}
    assert all(np.isfinite(r["loss"]) for r in results.values())


def test_mixed_task_packed_training_runs_and_resumes(tmp_path):
    """config.data.packing_mix_tasks: rows mix tasks, adapters route per token, one compiled
    step, a preempted run resumes bit-identically; prompt tuning and a missing packing=True are
    errors naming the key."""
    from mtlx.train import loop as LP
    cfg = local_cfg("--config.data.packing=True", "--config.data.packing_max_segments=4",
                    "--config.data.packing_mix_tasks=True", "--config.optim.num_train_steps=6",
                    "--config.eval_every=6", "--config.checkpoint.every=3")
    cfg.peft.methods = ({"method": "adapter", "variant": "houlsby", "reduction_factor": 4},)
    s = LP.setup(cfg)
    seg = np.asarray(s.init_batch.segments.task_ids)
    assert s.init_batch.segments.mixed
    assert max(len(set(r[r >= 0].tolist())) for r in seg) >= 2   # a row really mixes tasks
    results, full = train_and_evaluate(cfg, tmp_path / "full", progress=False, return_state=True)
    assert set(results) == {"cola", "stsb", "ud_pos"}
    assert all(np.isfinite(r["loss"]) for r in results.values())
    lines = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [l for l in lines if l["kind"] == "info"][-1]["compile/train_step_executables"] == 1


    train_and_evaluate(cfg, tmp_path / "pre", progress=False, on_step=preempt_at(4))
    _, resumed = train_and_evaluate(cfg, tmp_path / "pre", progress=False, return_state=True)
    for a, b in zip(leaves(resumed), leaves(full)):
        np.testing.assert_array_equal(a, b)

    prompt = local_cfg("--config.data.packing=True", "--config.data.packing_mix_tasks=True")
    prompt.tasks = ("cola", "stsb")
    prompt.peft.methods = ({"method": "prompt", "length": 2},)
    with pytest.raises(ValueError, match=r"config.data.packing_mix_tasks=True: \['prompt'\]"):
        LP.setup(prompt)
    with pytest.raises(ValueError, match="packing_mix_tasks=True needs config.data.packing=True"):
        LP.setup(local_cfg("--config.data.packing_mix_tasks=True"))


def test_cli_reports_unknown_key():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", DEMO,
                        "--workdir", "/tmp/unused", "--config.seeed=3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "did you mean config.seed" in r.stderr


def test_evaluate_and_predict_scripts(uninterrupted, tmp_path):
    wd, results, _ = uninterrupted
    common = ["--config", DEMO + ":local", "--workdir", str(wd), "--config.tasks=cola,stsb,ud_pos",
              "--config.model.hidden_dropout=0.0"]
    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *common, "--output", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    # Same numbers as training up to float noise: training evaluated sharded over 8 host devices,
    # the script on one; a barely trained model's near-tied regression outputs can swap ranks.
    assert got.keys() == results.keys()
    for task in results:
        assert got[task] == pytest.approx(results[task], rel=1e-4, abs=1e-3)
    req = tmp_path / "req.jsonl"
    # More requests of one task than an evaluation batch holds (64): rows of later batches.
    many = [json.dumps({"task": "ud_pos", "tokens": ["word"] * (k % 50 + 1)}) for k in range(70)]  # within max_length 64
    many.append(json.dumps({"task": "ud_pos", "tokens": ["word"] * 80}))  # 18 words past 64 tokens
    req.write_text('{"task": "cola", "sentence": "The cat sat."}\n'
                   '{"task": "stsb", "sentence1": "A dog runs.", "sentence2": "A dog is running."}\n'
                   '{"task": "ud_pos", "tokens": ["The", "cat", "sat", "."]}\n'
                   + json.dumps({"task": "ud_pos", "tokens": ["The", "cat", "\u200b"]}) + "\n"
                   + "\n".join(many) + "\n")
    pred = tmp_path / "pred.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), *common, "--input", str(req),
                        "--output", str(pred)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(l) for l in pred.read_text().splitlines()]
    assert rows[0]["prediction"] in ("unacceptable", "acceptable")
    assert isinstance(rows[1]["prediction"], float)
    assert len(rows[2]["prediction"]) == 4
    assert len(rows) == 75 and all(len(r["prediction"]) == len(r["tokens"]) for r in rows[2:-1])
    # a last word that makes no subword gets null; it was not cut by max_length
    assert rows[3]["prediction"][2] is None and "words_without_prediction" not in rows[3]
    cut = rows[-1]
    assert len(cut["prediction"]) + cut["words_without_prediction"] == 80
    assert cut["words_without_prediction"] == 18  # [CLS] + 62 words + [SEP] fill 64 tokens
    assert f"req.jsonl:75: task 'ud_pos': 18 of 80 words are past" in r.stderr
    assert "req.jsonl:4:" not in r.stderr
    # Tagging in windows (config.task_overrides): every word of the long input gets its tag,
    # the same tags where the input fit; a word that makes no subword gets null.
    long_req = tmp_path / "long.jsonl"
    long_req.write_text(many[-1] + "\n" + json.dumps({"task": "ud_pos", "tokens": ["a", "\u200b", "b"]}) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), *common, "--input", str(long_req),
                        "--output", str(pred), "--config.task_overrides=ud_pos.stride=16"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    whole, gap = [json.loads(l) for l in pred.read_text().splitlines()]
    assert len(whole["prediction"]) == 80 and "words_without_prediction" not in whole
    assert all(isinstance(t, str) for t in whole["prediction"])
    assert gap["prediction"][1] is None and all(gap["prediction"][i] for i in (0, 2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "nope", "sentence": "x"}\n')
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), *common, "--input", str(bad),
                        "--output", str(pred)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode != 0 and "bad.jsonl:1: unknown task 'nope'" in r.stderr


# glue_adapters in CI; the other two (about 30 s each) with the heavy tests (CI time budget).
@pytest.mark.parametrize("name", [pytest.param("glue_shared_encoder", marks=pytest.mark.heavy),
                                  "glue_adapters",
                                  pytest.param("glue_hyperformerpp", marks=pytest.mark.heavy)])
def test_config_local_variants_train(name, tmp_path):
    cfg = load_config(str(ROOT / "configs" / f"{name}.py") + ":local")
    full = load_config(str(ROOT / "configs" / f"{name}.py"))
    assert len(full.tasks) == 8 and full.optim.num_train_steps > 1000  # the real experiment
    results = train_and_evaluate(cfg, tmp_path, progress=False)
    assert set(results) == set(cfg.tasks)
    assert all(np.isfinite(r["loss"]) for r in results.values())


def test_keeps_last_and_best_by_chosen_metric(tmp_path):
    cfg = local_cfg("--config.eval_every=2", "--config.checkpoint.every=2", "--config.checkpoint.keep_last=1",
                    "--config.checkpoint.best_metric=stsb/pearson", "--config.checkpoint.best_mode=max")
    train_and_evaluate(cfg, tmp_path, progress=False)
    evals = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            evals[rec["step"]] = rec["eval/stsb/pearson"]
    best = max(evals, key=evals.get)
    ckpt = Checkpointer(tmp_path / "checkpoints", tasks=["cola", "stsb", "ud_pos"], model_signature={},
                        best_metric="stsb/pearson", read_only=True)
    assert ckpt.latest_step() == 6 and ckpt.best_step() == best
    assert set(ckpt.all_steps()) == {6, best}
    ckpt.close()
    with pytest.raises(KeyError, match="best_metric 'stsb/nope' is not an evaluation metric"):
        train_and_evaluate(local_cfg("--config.checkpoint.best_metric=stsb/nope"), tmp_path / "b", progress=False)


def test_packing_refuses_unpackable_tasks_naming_the_key():
    from types import SimpleNamespace
    from mtlx.models.bert import BertConfig
    from mtlx.train import loop as LP
    run = SimpleNamespace(train={"squad": SimpleNamespace(task="squad", head="span"),
                                 "sst2": SimpleNamespace(task="sst2", head="classification")})
    with pytest.raises(ValueError, match=r"config.data.packing=True: task\(s\) \['squad'\] cannot"):
        LP.make_packed_train_iterator(local_cfg(), run, None, BertConfig(vocab_size=8), (64,))


def test_span_task_is_scored_with_squad_text_em_f1(tmp_path):
    """SQuAD v1.1 and 2.0 tasks in one model, in the loop: evaluation decodes text answers
    (mtlx.train.spans) and reports SQuAD's exact match and F1, in [0, 1], next to the loss
    (SQuAD 2.0 with its answerable / unanswerable breakdown and best thresholds); predict.py
    answers both, "" meaning "no answer" for squad_v2 with the score that decided it."""
    context = ("Normandy is a region in France. The Normans gave their name to it. Rollo was "
               "their first ruler, and William the Conqueror won England in 1066. ")
    qas = [("In what country is Normandy?", "France"), ("Who gave their name to Normandy?", "The Normans"),
           ("Who was the first ruler?", "Rollo"), ("When was England won?", "1066")]
    impossible = [("Who ruled Normandy in 2100?", None), ("What is the capital of Spain?", None)]

    def doc(items):
        return {"version": "1.1", "data": [{"title": "Normandy", "paragraphs": [{
            "context": context * 2,
            "qas": [{"id": f"q{i}", "question": q, "is_impossible": a is None,
                     "answers": [] if a is None else [{"text": a, "answer_start": context.index(a)}]}
                    for i, (q, a) in enumerate(items)]}]}]}
    for task, items, files in (("squad", qas, ("train-v1.1.json", "dev-v1.1.json")),
                               ("squad_v2", qas + impossible, ("train-v2.0.json", "dev-v2.0.json"))):
        (tmp_path / task).mkdir()
        for name in files:
            (tmp_path / task / name).write_text(json.dumps(doc(items)))
    cfg = local_cfg("--config.optim.num_train_steps=2", "--config.eval_every=2",
                    "--config.checkpoint.every=2", f"--config.data.data_root={tmp_path}",
                    "--config.data.buckets=()")
    cfg.tasks = ("squad", "squad_v2")
    cfg.data.max_length = 48   # windows of 48 tokens, stride set below
    import dataclasses

    from mtlx.data import tasks as T
    specs = {t: T.get_task(t) for t in cfg.tasks}
    for spec in specs.values():
        T.register_task(dataclasses.replace(spec, stride=8), overwrite=True)
    req, pred = tmp_path / "req.jsonl", tmp_path / "pred.jsonl"
    # squad_v2 first: each task's answers are written after the task's batches (an earlier
    # version reused a name there and broke the tasks after a squad_v2 one).
    req.write_text("".join(json.dumps({"task": t, "question": q, "context": context * 2}) + "\n"
                           for t, items in (("squad_v2", qas + impossible), ("squad", qas))
                           for q, _ in items))
    try:
        results = train_and_evaluate(cfg, tmp_path / "wd", progress=False)
        sys.path.insert(0, str(ROOT / "scripts"))
        import predict
        predict.main(["--config", DEMO + ":local", "--workdir", str(tmp_path / "wd"),
                      "--input", str(req), "--output", str(pred), "--config.tasks=squad,squad_v2",
                      "--config.model.hidden_dropout=0.0", f"--config.data.data_root={tmp_path}",
                      "--config.data.buckets=()", "--config.data.max_length=48"])
    finally:
        for spec in specs.values():
            T.register_task(spec, overwrite=True)
    assert set(results["squad"]) == {"exact_match", "f1", "loss"}
    assert 0.0 <= results["squad"]["exact_match"] <= results["squad"]["f1"] <= 1.0
    v2 = results["squad_v2"]
    assert set(v2) == {"exact_match", "f1", "loss"} | {
        f"{g}.{m}" for g in ("has_answer", "no_answer") for m in ("exact_match", "f1")} | {
        "best.exact_match", "best.exact_match_threshold", "best.f1", "best.f1_threshold"}
    assert 0.0 <= v2["exact_match"] <= v2["f1"] <= 1.0 and v2["best.f1"] >= v2["f1"] - 1e-9
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    # Same model, same questions (dev = train here): an unanswerable question scores 1 when
    # answered "", so the no-answer exact match is the fraction predict.py answered "".
    nulls = [r["prediction"] == "" for r in rows[len(qas): len(qas) + len(impossible)]]
    assert v2["no_answer.exact_match"] == pytest.approx(sum(nulls) / len(nulls))
    assert [(r["task"], r["question"]) for r in rows] == (
        [("squad_v2", q) for q, _ in qas + impossible] + [("squad", q) for q, _ in qas])
    for r in rows:
        assert isinstance(r["prediction"], str) and r["prediction"] in r["context"]
        if r["task"] == "squad":  # text cut from the context, at most 30 word pieces
            assert r["prediction"] and "no_answer_score" not in r
        else:
            score = r["no_answer_score"]
            assert score is None or isinstance(score, float)
            assert (r["prediction"] == "") == (score is None or score > 0.0)

def test_task_overrides_change_specs_and_name_bad_entries():
    from mtlx.train import loop as LP
    cfg = local_cfg("--config.task_overrides=ud_pos.stride=16,ud_pos.truncation=only_first")
    specs = {s.name: s for s in LP.build_specs(cfg)}
    assert (specs["ud_pos"].stride, specs["ud_pos"].truncation, specs["cola"].stride) == (16, "only_first", 0)
    for entry, message in (("ud_pos.stride", "expected 'task.field=value'"),
                           ("sst2.stride=3", r"task 'sst2' is not in config.tasks \['cola', 'stsb', 'ud_pos'\]"),
                           ("ud_pos.labels=a", "field 'labels' cannot be overridden"),
                           ("ud_pos.stride=many", "stride must be int, got 'many'"),
                           ("cola.null_answers=yes", "null_answers must be bool, got 'yes'"),
                           ("cola.null_answers=true", "task .cola.: null_answers .* is for span tasks"),
                           ("ud_pos.stride=100", r"task .ud_pos.: stride must be in \[0, max_length/2\)")):
        with pytest.raises(ValueError, match=rf"config.task_overrides entry '{entry}': {message}"):
            LP.build_specs(local_cfg(f"--config.task_overrides={entry}"))


def test_tagging_in_windows_trains_and_evaluates(tmp_path):
    """config.task_overrides=ud_pos.stride: long sentences train and evaluate as overlapping
    windows (every word tagged once), with one compiled step."""
    from mtlx.train import loop as LP
    cfg = local_cfg("--config.task_overrides=ud_pos.stride=6", "--config.data.max_length=24",
                    "--config.data.buckets=()", "--config.optim.num_train_steps=2",
                    "--config.eval_every=2", "--config.checkpoint.every=2")
    cfg.tasks = ("ud_pos",)
    s = LP.setup(cfg)
    ev = s.run.eval["ud_pos"]
    assert ev.num_rows > ev.num_examples and ev.stats["words_truncated"] == 0
    results = train_and_evaluate(cfg, tmp_path, progress=False)
    assert 0.0 <= results["ud_pos"]["token_accuracy"] <= 1.0 and np.isfinite(results["ud_pos"]["loss"])


def test_plots_leave_breakdowns_out():
    from mtlx.train.logs import plot_groups
    keys = ["train/loss", "train/loss/cola", "eval/cola/loss", "eval/cola/mcc", "eval/avg",
            "eval/squad_v2/f1", "eval/squad_v2/has_answer.f1", "eval/squad_v2/best.f1_threshold",
            "perf/examples_per_s"]
    assert plot_groups(keys) == {
        "loss_curves.png": ["eval/cola/loss", "train/loss", "train/loss/cola"],
        "metric_curves.png": ["eval/avg", "eval/cola/mcc", "eval/squad_v2/f1"]}


def test_frozen_kernels_in_bf16_train_the_same_steps(tmp_path):
    """config.model.frozen_dtype='bfloat16' with a bf16 model and adapters: the frozen
    backbone's kernels are stored in bf16 (the trainable adapters, heads and layer norms stay
    float32), the run trains exactly as with the per-step cast (the kernels were rounded to bf16
    before every product anyway), resumes from its checkpoint bit-identically, and a frozen
    dtype other than the compute dtype is an error naming the key."""
    import jax.numpy as jnp
    from mtlx.train import loop as LP
    base = ("--config.model.dtype=bfloat16", "--config.optim.num_train_steps=4",
            "--config.eval_every=4", "--config.checkpoint.every=2")
    adapters = ({"method": "adapter", "variant": "houlsby", "reduction_factor": 4},)
    plain = local_cfg(*base)
    cast = local_cfg(*base, "--config.model.frozen_dtype=bfloat16")
    plain.peft.methods = cast.peft.methods = adapters
    s = LP.setup(cast)
    import flax.traverse_util as tu
    flat_p = tu.flatten_dict(jax.device_get(s.state.params), sep="/")
    flat_t = tu.flatten_dict(s.trainable, sep="/")
    kernels = [k for k in flat_p if k.endswith("/kernel") and not flat_t[k]]
    assert kernels and all(flat_p[k].dtype == jnp.bfloat16 for k in kernels)
    assert all(v.dtype == jnp.float32 for k, v in flat_p.items() if k not in kernels)
    assert any(flat_t[k] and k.endswith("/kernel") for k in flat_p)      # adapters' kernels
    r_plain, st_plain = train_and_evaluate(plain, tmp_path / "plain", progress=False, return_state=True)
    r_cast, st_cast = train_and_evaluate(cast, tmp_path / "cast", progress=False, return_state=True)
    for task in r_plain:
        assert r_cast[task]["loss"] == r_plain[task]["loss"], task
    fp = tu.flatten_dict(jax.device_get(st_plain.params), sep="/")
    fc = tu.flatten_dict(jax.device_get(st_cast.params), sep="/")
    for k in fp:
        np.testing.assert_array_equal(np.asarray(fc[k], np.float32),
                                      np.asarray(fp[k].astype(fc[k].dtype), np.float32), err_msg=k)


    train_and_evaluate(cast, tmp_path / "pre", progress=False, on_step=preempt_at(3))
    _, resumed = train_and_evaluate(cast, tmp_path / "pre", progress=False, return_state=True)
    for a, b in zip(leaves(resumed), leaves(st_cast)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"config.model.frozen_dtype='bfloat16' stores frozen "
                                         r"kernels in the compute dtype, but the model computes in float32"):
        LP.setup(local_cfg("--config.model.frozen_dtype=bfloat16"))
    with pytest.raises(ValueError, match=r"config.model.frozen_dtype='int8': must be None or one of"):
        LP.setup(local_cfg("--config.model.dtype=bfloat16", "--config.model.frozen_dtype=int8"))


def test_metrics_jsonl_is_strict_json(tmp_path):
    """A value that is not finite (an undefined metric, no learning rate) is written null:
    Python's json would write a bare NaN, which jq and other strict parsers refuse."""
    from mtlx.train.logs import RunLogger
    logger = RunLogger(tmp_path)
    logger.write(1, {"eval/stsb/pearson": float("nan"), "x": float("inf"), "train/loss": 0.5})
    logger.close()
    logger.close()  # closing twice is harmless (the loop closes on an error path too)

    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {
        "step": 1, "kind": "train", "eval/stsb/pearson": None, "x": None, "train/loss": 0.5}


def test_best_is_the_runs_own_best_and_checkpoint_names_are_checked(tmp_path):
    """'best' ranks by the training run's best_metric / best_mode (saved with its config),
    whatever the evaluating command's config says; a wrong --checkpoint is named."""
    from mtlx.train import loop as LP
    cfg = local_cfg("--config.eval_every=2", "--config.checkpoint.every=2",
                    "--config.checkpoint.keep_last=3", "--config.checkpoint.best_metric=cola/loss",
                    "--config.checkpoint.best_mode=max")
    train_and_evaluate(cfg, tmp_path, progress=False)
    ckpt = Checkpointer(tmp_path / "checkpoints", tasks=["cola", "stsb", "ud_pos"], model_signature={})
    steps = ckpt.all_steps()
    losses = {s: ckpt.metrics(s)["cola/loss"] for s in steps}
    ckpt.close()
    assert steps == [2, 4, 6] and len(set(losses.values())) == 3
    s = LP.setup(local_cfg(), train=False)  # best_metric 'avg', best_mode 'max'
    assert LP.restore_state(s, tmp_path, "best").step == max(losses, key=losses.get)
    with pytest.raises(ValueError, match=r"checkpoint must be 'latest', 'best' or a step number, got 'bset'"):
        LP.restore_state(s, tmp_path, "bset")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 99 in .*; its steps: \[2, 4, 6\]"):
        LP.restore_state(s, tmp_path, "99")


def test_predict_requests_are_checked_naming_file_and_line(tmp_path):
    """Bad requests end predict.py with the file, the line and what is wrong (before: raw
    tracebacks from the decoder, a list's .get, or deep inside the tokenizer)."""
    import importlib.util
    from types import SimpleNamespace
    spec = importlib.util.spec_from_file_location("predict_script", ROOT / "scripts" / "predict.py")
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    specs = {"cola": SimpleNamespace(name="cola", head="classification", text_fields=("sentence",)),
             "ud_pos": SimpleNamespace(name="ud_pos", head="token_classification", text_fields=("tokens",))}
    req = tmp_path / "r.jsonl"
    for body, message in [
            (b'\xef\xbb\xbf{"task": "cola", "sentence": "x"}\n\n{"task": "cola", "sentence": "caf\xe9"}\n',
             r"r.jsonl:3: not UTF-8 \(byte \d+ of the line\)"),
            (b'[1, 2]\n', r"r.jsonl:1: a request is a JSON object, got list")]:
        req.write_bytes(body)
        with pytest.raises(SystemExit, match=message):
            P.read_requests(req, specs)
    req.write_bytes(b'\xef\xbb\xbf{"task": "cola", "sentence": "x"}\n')  # a BOM is not an error
    assert P.read_requests(req, specs) == {"cola": [(1, {"task": "cola", "sentence": "x"})]}
    for rec, message in [({"sentence": 123}, r"'sentence' is 123"),
                         ({"sentence": ["a", "b"]}, r"'sentence' is \['a', 'b'\]"),
                         ({"a": 1}, r"'sentence' is None")]:
        with pytest.raises(SystemExit, match=r"in.jsonl:7: task 'cola' needs fields \['sentence'\] "
                                             r"as non-empty strings; " + message):
            P.request_texts(rec, specs["cola"], "in.jsonl:7")
    for words in (["a", 3], [], "a b", ["a", " "]):
        with pytest.raises(SystemExit, match=r"task 'ud_pos' needs \"tokens\": a non-empty list"):
            P.request_texts({"tokens": words}, specs["ud_pos"], "in.jsonl:2")
    tok = load_tokenizer_for_tests()
    assert P.words_cut(["The", "cat", "\u200b"], 2, tok) == 0
    assert P.words_cut(["The", "cat", "\u200b", "sat"], 2, tok) == 1  # "sat" on: cut
    assert P.words_cut(["The", "cat"], 2, tok) == 0


def load_tokenizer_for_tests():
    from mtlx.data import load_tokenizer, sample_root
    return load_tokenizer(sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt")


def test_a_resumed_run_logs_from_its_checkpoint(tmp_path):
    """Rows logged by steps after the checkpoint a run resumes from (lost with the crash) are
    dropped from metrics.jsonl, the curves cover the whole run, and TensorBoard is told to
    purge its events after the resume step."""
    from mtlx.train.logs import RunLogger
    logger = RunLogger(tmp_path)
    for step in (2, 4, 6):
        logger.write(step, {"train/loss": 1.0 / step})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "kind": "train", "train/lo')  # cut short by the crash
    resumed = RunLogger(tmp_path, resume_step=4)
    resumed.write(6, {"train/loss": 0.2})
    resumed.close()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(2, 0.5), (4, 0.25), (6, 0.2)]
    assert resumed.history["train/loss"] == [(2, 0.5), (4, 0.25), (6, 0.2)]
    from tensorboardX.proto import event_pb2
    import struct
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # the resumed run's own file, even within the same second
    newest = max(files, key=lambda p: p.stat().st_mtime_ns).read_bytes()
    (n,) = struct.unpack_from("<Q", newest, 0)
    at = 12 + n + 4  # after the file version record
    (n,) = struct.unpack_from("<Q", newest, at)
    first = event_pb2.Event.FromString(newest[at + 12: at + 12 + n])
    assert first.step == 5 and first.session_log.status == event_pb2.SessionLog.START


def test_a_text_to_text_peft_run_trains_without_heads(tmp_path):
    """A text-to-text T5 has no task heads: the default trainable patterns leave the heads'
    pattern out instead of failing on it (the config.trainable check: it matched nothing)."""
    from mtlx.train import loop as LP
    cfg = apply_overrides(load_config(str(ROOT / "configs" / "glue_hyperformerpp.py") + ":local"),
                          ["--config.text_to_text=True", "--config.tasks=('rte','stsb')"])
    s = LP.setup(cfg, train=False)
    import flax.traverse_util as tu
    flat = tu.flatten_dict(s.trainable, sep="/")
    assert not any(k.startswith("heads/") for k in flat)
    assert any(v for k, v in flat.items() if "hyper" in k) and not all(flat.values())
