"""Workdirs and checkpoints in a bucket (gs://), against a local GCS emulator (the `bucket`
fixture of conftest.py)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mtlx import paths
from mtlx.train.checkpoint import Checkpointer
from mtlx.train.loop import train_and_evaluate
from tests.test_train_loop import leaves, local_cfg, preempted_and_resumed


def test_path_forms(tmp_path):
    assert paths.as_path(tmp_path) == tmp_path
    assert paths.as_path(f"file://{tmp_path}") == tmp_path
    url = paths.as_path("gs://b/run")
    assert paths.is_url(url) and os.fspath(url / "checkpoints") == "gs://b/run/checkpoints"
    assert paths.directory_string("gs://b/run/") == "gs://b/run"
    assert paths.directory_string("rel") == os.path.abspath("rel")
    # pathlib.Path("gs://b/run") is 'gs:/b/run': refused with the fix, not written locally
    with pytest.raises(ValueError, match=r"pass the URL as a string \('gs://b/run'\)"):
        paths.as_path("gs:/b/run")


def test_local_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "r.json"
    paths.write_atomic(target, "1")
    paths.write_atomic(target, b"2")
    log = paths.LineLog(tmp_path / "m.jsonl")
    log.append("a\n")
    paths.LineLog(tmp_path / "m.jsonl").append("b\n")  # a resumed run appends
    assert target.read_text() == "2" and (tmp_path / "m.jsonl").read_text() == "a\nb\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "r.json"]


def test_bucket_objects(bucket):
    d = paths.as_path(bucket) / "objects"
    paths.write_atomic(d / "x.json", '{"a": 1}')
    log = paths.LineLog(d / "m.jsonl")
    log.append("a\n")
    log.append("b\n")
    paths.LineLog(d / "m.jsonl").append("c\n")  # reopened: appends after what is there
    assert json.loads((d / "x.json").read_text()) == {"a": 1}
    assert (d / "m.jsonl").read_text() == "a\nb\nc\n"


def test_bucket_log_appends_by_compose(bucket, monkeypatch):
    """A gs:// LineLog uploads each append's lines and composes them onto the object (no part
    objects left), writing the object whole at its first append and every REWRITE_EVERY
    appends."""
    d = paths.as_path(bucket) / "composed"
    monkeypatch.setattr(paths.ObjectAppender, "REWRITE_EVERY", 3)
    log = paths.LineLog(d / "m.jsonl")
    composes, real_compose = [], paths.ObjectAppender._compose

    def compose(self, part):
        # the part sits beside the object, named so TensorBoard never takes it for an event file
        parts = [p.name for p in d.iterdir() if p.name != "m.jsonl" and p.name != "w.jsonl"]
        composes.append(parts)
        return real_compose(self, part)
    monkeypatch.setattr(paths.ObjectAppender, "_compose", compose)
    lines = [f'{{"step": {i}}}\n' for i in range(9)]
    for line in lines:
        log.append(line)
    # whole writes at appends 1, 5 and 9; the six between composed a part each
    assert len(composes) == 6 and all(len(c) == 1 and c[0].startswith(".mtlx-part.")
                                      for c in composes)
    assert (d / "m.jsonl").read_text() == "".join(lines)
    assert [p.name for p in d.iterdir()] == ["m.jsonl"]
    paths.LineLog(d / "m.jsonl").append("end\n")  # reopened (a resumed run): appends
    assert (d / "m.jsonl").read_text() == "".join(lines) + "end\n"
    # content the caller has just written whole: not read back, the first append composes
    paths.write_atomic(d / "w.jsonl", "kept\n")
    composes.clear()
    written = paths.LineLog(d / "w.jsonl", written="kept\n")
    written.append("next\n")
    assert len(composes) == 1 and (d / "w.jsonl").read_text() == "kept\nnext\n"


@pytest.mark.parametrize("store", ["gcs", "ignores_preconditions"])
def test_a_compose_whose_reply_is_lost_is_not_applied_twice(bucket, monkeypatch, store):
    """The store composes, the reply is lost (503), gcsfs retries. GCS refuses the retry
    (ifGenerationMatch: 412) and the object's size shows the first attempt took; a store
    that ignores the condition composes twice, and the size mismatch has the log written
    whole. Either way each line is there once."""
    from tests.conftest import GCS_EMULATOR
    monkeypatch.setattr(GCS_EMULATOR, "honor_compose_preconditions", store == "gcs")
    lost = []

    def lose_first_reply(response):
        if not lost:
            lost.append(1)
            response.status = 503
    monkeypatch.setattr(GCS_EMULATOR, "after_compose", lose_first_reply)
    url = f"{bucket}/lost_reply_{store}/m.jsonl"
    log = paths.LineLog(url)
    log.append("line1\n")
    log.append("line2\n")  # composed, reply lost, retried
    assert lost and paths.as_path(url).read_text() == "line1\nline2\n"
    log.append("line3\n")
    assert paths.as_path(url).read_text() == "line1\nline2\nline3\n"


def test_a_listing_does_not_hide_later_appends(bucket):
    """Listing the directory (a notebook, a resumed run in the same process) caches its
    entries; a compose must not leave them stale, or a reopened log reads the old object and
    writes it back whole without the lines composed since."""
    d = paths.as_path(bucket) / "listed"
    log = paths.LineLog(d / "m.jsonl")
    log.append("1\n")
    log.append("2\n")
    assert [p.name for p in d.iterdir()] == ["m.jsonl"]
    log.append("3\n")
    assert (d / "m.jsonl").read_text() == "1\n2\n3\n"
    paths.LineLog(d / "m.jsonl").append("4\n")
    assert (d / "m.jsonl").read_text() == "1\n2\n3\n4\n"


def test_checkpointer_in_a_bucket(bucket):
    where = f"{bucket}/ckpt"
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    with Checkpointer(where, tasks=["a", "b"], model_signature={"d": 3}, keep_last=2) as ck:
        assert ck.directory == where
        for step in range(1, 5):
            ck.save(step, {"w": state["w"] * step, "step": jnp.int32(step)},
                    data_state={"seen": step})
    # a step written without its commit marker (a save cut off in a bucket) is not a checkpoint
    paths.write_atomic(paths.as_path(where) / "9" / "state" / "partial", "x")
    reader = Checkpointer(where, tasks=["a", "b"], model_signature={"d": 3}, read_only=True)
    try:
        assert reader.all_steps() == [3, 4]
        assert (paths.as_path(where) / "4" / "commit_success.txt").exists()
        got = reader.restore_latest(state)
        assert got.step == 4 and got.data_state == {"seen": 4}
        np.testing.assert_array_equal(got.state["w"], np.arange(6.0).reshape(2, 3) * 4)
    finally:
        reader.close()


def test_run_in_a_bucket_resumes_like_an_uninterrupted_local_run(bucket, tmp_path):
    """Preempted at step 3 and resumed in gs://: the same parameters, bit for bit, as one
    local run; the bucket holds every output of the run."""
    _, local_state = train_and_evaluate(local_cfg(), tmp_path, progress=False, return_state=True)
    wd = f"{bucket}/run"
    results, resumed = preempted_and_resumed(wd)
    assert int(resumed.step) == int(local_state.step) == 6
    for a, b in zip(leaves(resumed), leaves(local_state)):
        np.testing.assert_array_equal(a, b)

    run = paths.as_path(wd)
    assert json.loads((run / "eval_results.json").read_text()) == json.loads(json.dumps(results))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if line["kind"] == "train"]
    assert min(steps) <= 3 < max(steps)  # both parts of the run, the first kept on resume
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert (run / "plots" / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    events = [p for p in (run / "tensorboard").iterdir() if "tfevents" in p.name]
    assert len(events) == 2 and not [p for p in (run / "tensorboard").iterdir() if "part" in p.name]
    # the objects (written, then appended to by compose) are whole TFRecord streams of events
    # holding every logged scalar step of their part of the run
    import re  # tags as tensorboardX cleans them ('cola->stsb' -> 'cola-_stsb')
    logged = {(x["step"], re.sub(r"[^-/\w\.]", "_", k)) for x in lines for k, v in x.items()
              if k not in ("step", "kind") and v is not None}  # null: not finite
    assert set().union(*(_event_scalars(p.read_bytes()) for p in events)) == logged


def _event_scalars(data: bytes) -> set:
    """{(step, tag)} of the scalar summaries in a TFRecord stream of TensorBoard events; the
    records' framing (lengths) is checked as it is read."""
    import struct
    from tensorboardX.proto import event_pb2
    out, at = set(), 0
    while at < len(data):
        (n,) = struct.unpack_from("<Q", data, at)
        assert at + 12 + n + 4 <= len(data), "a truncated record"
        event = event_pb2.Event.FromString(data[at + 12: at + 12 + n])
        out |= {(event.step, v.tag) for v in event.summary.value}
        at += 12 + n + 4
    return out


def test_each_logged_interval_reaches_the_bucket_when_written(bucket):
    """RunLogger in a bucket: right after each write, the event object holds that write's
    scalars and metrics.jsonl its line."""
    from mtlx.train.logs import RunLogger
    run = paths.as_path(bucket) / "interval_logs"
    logger = RunLogger(run)
    try:
        for step in (1, 2, 3):
            logger.write(step, {f"train/a{step}": 0.5, f"train/b{step}": 1.5})
            objects = list((run / "tensorboard").iterdir())
            assert len(objects) == 1 and "tfevents" in objects[0].name
            got = _event_scalars(objects[0].read_bytes())
            assert got == {(i, f"train/{x}{i}") for i in range(1, step + 1) for x in "ab"}
            assert len((run / "metrics.jsonl").read_text().splitlines()) == step
    finally:
        logger.close()


def _two_process_config(tmp_path, steps, every=3):
    """The demo's local config for two processes: cola and stsb, one length bucket, `steps`
    steps, checkpoints and evaluations every `every` steps."""
    path = tmp_path / f"config_{steps}_{every}.py"
    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "demo.py")
    path.write_text("from mtlx.train.config import load_config\n\n"
                    "def get_config(arg=None):\n"
                    f"    c = load_config({demo + ':local'!r})\n"
                    "    c.tasks = ('cola', 'stsb')\n"
                    "    c.data.buckets = (c.data.max_length,)  # one bucket: several processes\n"
                    f"    c.optim.num_train_steps = {steps}\n"
                    f"    c.checkpoint.every = {every}\n"
                    f"    c.eval_every = {every}\n"
                    "    return c\n")
    return str(path)


@pytest.mark.parametrize("where", ["local", pytest.param("bucket", marks=pytest.mark.heavy)])
def test_two_process_run_resumes(where, tmp_path, request):
    """Two processes (gloo) share one workdir, a local directory or (a TPU pod's way) a gs://
    bucket. Each writes its part of the checkpoints; a second two-process run resumes from
    them: the restore reads each process's shards straight into the global mesh's shardings
    (arrays restored onto one process's devices could not be moved there)."""
    from tests.test_multihost import run_two_workers
    wd = (f"{request.getfixturevalue('bucket')}/two_process_run" if where == "bucket"
          else str(tmp_path / "two_process_run"))
    for steps in (3, 6):
        out = tmp_path / f"results_{steps}.json"
        config = _two_process_config(tmp_path, steps)
        run_two_workers("mh_loop_worker.py",
                        lambda port, i: [port, str(i), config, wd, str(out)], timeout=600)
        assert set(json.loads(out.read_text())) == {"cola", "stsb"}
    run = paths.as_path(wd)
    committed = sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                       if p.name.isdigit() and (p / "commit_success.txt").exists())
    assert committed == [3, 6]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # one evaluation each at 3 and 6: the second run resumed at 3 (a fresh start would
    # have evaluated at 3 again)
    assert [line["step"] for line in lines if line["kind"] == "eval"] == [3, 6]
    assert json.loads((run / "eval_results.json").read_text()).keys() == {"cola", "stsb"}


@pytest.mark.parametrize("mode", ["sync_manager", pytest.param("allgather", marks=pytest.mark.heavy)])
def test_two_processes_stop_at_one_step_when_one_is_preempted(mode, tmp_path, monkeypatch):
    """Process 1 of 2 gets SIGTERM after step 2 of 40. The loop's PreemptionWatch leaves the
    signal to JAX's preemption sync manager (no all-gather of a flag after every step): the
    coordination service picks a step, both processes stop there, save it and exit 0; a
    second run resumes from it to the end. 'allgather': the same with the service off
    (JAX_ENABLE_PREEMPTION_SERVICE=false), the fallback that all-gathers the flag."""
    from tests.test_multihost import run_two_workers
    monkeypatch.setenv("JAX_ENABLE_PREEMPTION_SERVICE", "true" if mode == "sync_manager" else "false")
    wd, out = tmp_path / "run", tmp_path / "stop.json"
    config = _two_process_config(tmp_path, 40, every=100)
    run_two_workers("mh_loop_worker.py",
                    lambda port, i: [port, str(i), config, str(wd), str(out), "2"], timeout=600)
    stops = [json.loads((tmp_path / f"stop.json.{i}").read_text()) for i in range(2)]
    assert [s["mode"] for s in stops] == [[mode]] * 2
    step = stops[0]["step"]
    assert stops[1]["step"] == step and 2 <= step < 40, stops
    ckpts = wd / "checkpoints"
    committed = lambda: sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())  # noqa: E731
    assert committed() == [step]
    run_two_workers("mh_loop_worker.py",
                    lambda port, i: [port, str(i), config, str(wd), str(out)], timeout=600)
    assert set(json.loads(out.read_text())) == {"cola", "stsb"}
    assert committed() == [step, 40]


def test_evaluate_and_predict_read_a_bucket(bucket, tmp_path):
    """scripts/evaluate.py and predict.py with the workdir, the requests and the outputs in a
    bucket."""
    import subprocess
    import sys
    from tests.test_train_loop import DEMO, ROOT
    wd = f"{bucket}/scripts_run"
    cfg = local_cfg("--config.optim.num_train_steps=2", "--config.eval_every=2")
    results = train_and_evaluate(cfg, wd, progress=False)
    common = ["--config", DEMO + ":local", "--workdir", wd, "--config.tasks=cola,stsb,ud_pos",
              "--config.model.hidden_dropout=0.0", "--config.optim.num_train_steps=2"]
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), *common],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((paths.as_path(wd) / "eval_results.json").read_text())
    assert got.keys() == results.keys()
    for task in results:
        assert got[task] == pytest.approx(results[task], rel=1e-4, abs=1e-3)
    req, pred = f"{bucket}/requests.jsonl", f"{bucket}/predictions.jsonl"
    paths.write_atomic(req, '{"task": "cola", "sentence": "The cat sat."}\n'
                            '{"task": "ud_pos", "tokens": ["The", "cat", "sat", "."]}\n')
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "predict.py"), *common,
                        "--input", req, "--output", pred],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in paths.as_path(pred).read_text().splitlines()]
    assert rows[0]["prediction"] in ("unacceptable", "acceptable") and len(rows[1]["prediction"]) == 4


def upload(local, url):
    """Copies a local file or directory tree to `url`."""
    local = paths.as_path(local)
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(local).as_posix() if f != local else ""
        paths.write_atomic(f"{url}/{rel}" if rel else url, f.read_bytes())


def test_local_copy_downloads_once_and_again_when_changed(bucket, tmp_path):
    src = f"{bucket}/copy_src"
    paths.write_atomic(f"{src}/a.txt", "one")
    paths.write_atomic(f"{src}/sub/b.txt", "two")
    cache = tmp_path / "cache"
    got = paths.local_copy(src, cache_dir=cache)
    assert (got / "a.txt").read_text() == "one" and (got / "sub" / "b.txt").read_text() == "two"
    (got / "a.txt").write_text("edited locally")  # an unchanged listing: not downloaded again
    assert paths.local_copy(src, cache_dir=cache) == got and (got / "a.txt").read_text() == "edited locally"
    paths.write_atomic(f"{src}/a.txt", "three!")  # the bucket changed: downloaded again
    assert (paths.local_copy(src, cache_dir=cache) / "a.txt").read_text() == "three!"
    one = paths.local_copy(f"{src}/sub/b.txt", cache_dir=cache)  # a single object
    assert one.read_text() == "two" and one.name == "b.txt"
    assert paths.local_copy(str(tmp_path), cache_dir=cache) == str(tmp_path)  # local: itself
    with pytest.raises(FileNotFoundError, match=r"config.model.checkpoint: gs://mtlx-test/nope"):
        paths.local_copy(f"{bucket}/nope", what="config.model.checkpoint", cache_dir=cache)


def test_local_copy_sees_changes_made_elsewhere_and_keeps_odd_names(bucket, tmp_path, monkeypatch):
    import gcsfs
    cache = tmp_path / "cache"
    paths.write_atomic(f"{bucket}/changed/vocab.txt", "old\n")
    assert (paths.local_copy(f"{bucket}/changed", cache_dir=cache) / "vocab.txt").read_text() == "old\n"
    # another host rewrites it (another client: this process's listing cache never hears of it)
    gcsfs.GCSFileSystem(skip_instance_cache=True).pipe_file("mtlx-test/changed/vocab.txt", b"new!\n")
    assert (paths.local_copy(f"{bucket}/changed", cache_dir=cache) / "vocab.txt").read_text() == "new!\n"
    # objects named like the cache's own files (its marker, its lock)
    for name in ("listing.json", "lock"):
        paths.write_atomic(f"{bucket}/odd/{name}", f"content of {name}\n")
        for _ in range(2):
            got = paths.local_copy(f"{bucket}/odd/{name}", cache_dir=cache)
            assert got.read_text() == f"content of {name}\n"
    # a relative (or ~) cache directory: the copy's path is absolute, whatever the cwd later
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTLX_REMOTE_CACHE", "relative_cache")
    got = paths.local_copy(f"{bucket}/changed")
    assert got.is_absolute() and got.is_relative_to(tmp_path / "relative_cache")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MTLX_REMOTE_CACHE", "~/c")
    assert paths.local_copy(f"{bucket}/changed").is_relative_to(tmp_path / "home" / "c")


def test_model_tokenizer_and_data_from_a_bucket(bucket, tmp_path, monkeypatch):
    """config.model.checkpoint, config.data.tokenizer and config.data.data_root as gs:// URLs
    train and evaluate as the same local paths do."""
    from mtlx import data as D
    from tests.hf_tiny import save_tiny_bert
    monkeypatch.setenv("MTLX_REMOTE_CACHE", str(tmp_path / "cache"))
    model_dir, _ = save_tiny_bert(tmp_path, vocab_size=30522)
    vocab = D.sample_root() / "vocab" / "bert-base-uncased" / "vocab.txt"
    upload(model_dir, f"{bucket}/inputs/model")
    upload(vocab, f"{bucket}/inputs/vocab.txt")
    for task in ("CoLA", "STS-B"):
        upload(D.sample_root() / "glue" / task, f"{bucket}/inputs/data/glue/{task}")

    def run(model, tokenizer, data_root, workdir):
        cfg = local_cfg("--config.optim.num_train_steps=2", "--config.eval_every=2")
        cfg.tasks = ("cola", "stsb")
        cfg.model.checkpoint, cfg.data.tokenizer, cfg.data.data_root = model, tokenizer, data_root
        return train_and_evaluate(cfg, workdir, progress=False)

    local = run(model_dir, str(vocab), str(D.sample_root()), tmp_path / "local")
    remote = run(f"{bucket}/inputs/model", f"{bucket}/inputs/vocab.txt", f"{bucket}/inputs/data",
                 tmp_path / "remote")
    assert remote == local and set(local) == {"cola", "stsb"}
    assert list((tmp_path / "cache").iterdir())  # the inputs came through the cache


def test_task_files_from_a_bucket(bucket, tmp_path, monkeypatch):
    """A task declared in config.tasks with its files as gs:// URLs, and one whose "root" is a
    gs:// folder, load (through this host's cache) the examples their local files give."""
    from mtlx import data as D
    from mtlx.train.loop import load_data
    monkeypatch.setenv("MTLX_REMOTE_CACHE", str(tmp_path / "cache"))
    sst2 = D.sample_root() / "glue" / "SST-2"
    upload(sst2, f"{bucket}/tasks/sst2")

    def entry(name, files, root=None):
        e = {"name": name, "head": "classification", "format": "tsv", "files": files,
             "columns": {"text": "sentence", "label": "label"}, "labels": ["0", "1"]}
        return dict(e, root=root) if root else e

    local = entry("reviews", {"train": str(sst2 / "train.tsv"), "dev": str(sst2 / "dev.tsv")})
    by_url = entry("reviews", {"train": f"{bucket}/tasks/sst2/train.tsv",
                               "dev": f"{bucket}/tasks/sst2/dev.tsv"})
    by_root = entry("reviews", {"train": "train.tsv", "dev": "dev.tsv"}, root=f"{bucket}/tasks/sst2")

    def load(e):
        cfg = local_cfg()
        cfg.tasks = (e,)
        run = load_data(cfg)
        return run.specs[0], run.train["reviews"], run.eval["reviews"]

    want = load(local)
    for e in (by_url, by_root):
        spec, train, dev = load(e)
        assert not any(paths.is_url(f.path) for f in spec.source.files)
        assert not paths.is_url(spec.source.root)
        for got, ref in ((train, want[1]), (dev, want[2])):
            assert len(got.unit_example) == len(ref.unit_example) > 0
            np.testing.assert_array_equal(got.input_ids, ref.input_ids)
            np.testing.assert_array_equal(got.row_starts, ref.row_starts)
            np.testing.assert_array_equal(got.labels, ref.labels)
    with pytest.raises(FileNotFoundError, match=r"task 'reviews' split 'dev': gs://mtlx-test/tasks/nope"):
        load(entry("reviews", {"train": f"{bucket}/tasks/sst2/train.tsv",
                               "dev": f"{bucket}/tasks/nope/dev.tsv"}))
