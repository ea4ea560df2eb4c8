"""Readers: GLUE TSV (with its real quirks), CoNLL-U, CoNLL-2003, SuperGLUE JSONL, SQuAD JSON,
on the embedded sample, on the full staged data (row counts and label counts from SOURCES.md),
and every bad-input path (error naming file and line, or the skip policy's counts)."""

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from mtlx.data import DataError, load_split, sample_root
from mtlx.data.tasks import get_task

SHARED = Path(os.environ.get("MTLX_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"full data not present at {SHARED}")

SAMPLE = sample_root()
GLUE_SPLITS = [("cola", "train"), ("cola", "dev"), ("cola", "test"), ("sst2", "train"),
               ("sst2", "dev"), ("sst2", "test"), ("mrpc", "train"), ("mrpc", "dev"),
               ("mrpc", "test"), ("stsb", "train"), ("stsb", "dev"), ("stsb", "test"),
               ("rte", "train"), ("rte", "dev"), ("rte", "test"), ("wnli", "train"),
               ("wnli", "dev"), ("wnli", "test"), ("qnli", "dev"), ("qnli", "test")]


def _sample_counts():
    """Row counts from the sample README's table (`| `path` | rows | sha |`)."""
    text = (SAMPLE / "README.md").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"\| `([^`]+)` \| (\d+) \|", text)}


def test_sample_size_and_attribution():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert total <= 3 * 1024 * 1024, total
    readme = (SAMPLE / "README.md").read_text()
    for needle in ("CC BY-SA 4.0", "Apache-2.0", "15d613d8447b3478787d4c278730a1e48a945efb",
                   "44c152c8e3d84720112dd92fc7e1b767b3b0558c"):
        assert needle in readme
    assert (SAMPLE / "ud_english_ewt" / "LICENSE.txt").is_file()


@pytest.mark.parametrize("task,split", GLUE_SPLITS)
def test_sample_glue_counts(task, split):
    data = load_split(task, split)
    rel = f"glue/{Path(data.path).parent.name}/{Path(data.path).name}"
    assert len(data) == _sample_counts()[rel]
    assert data.report.num_skipped == 0
    assert data.labelled == (split != "test")
    assert all((ex.label is None) == (split == "test") for ex in data.examples)


def test_glue_quirks_in_sample():
    raw = (SAMPLE / "glue/MRPC/train.tsv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfQuality")  # the BOM is really there ...
    mrpc = load_split("mrpc", "train")              # ... and the header still maps
    assert mrpc.examples[0].texts[0] and mrpc.examples[0].label in (0, 1)
    cola_dev = (SAMPLE / "glue/CoLA/dev.tsv").read_bytes()
    assert not cola_dev.endswith(b"\n")  # CoLA dev has no final newline
    last = cola_dev.decode().split("\n")[-1].split("\t")
    dev = load_split("cola", "dev")
    assert dev.examples[-1].texts[0] == last[3] and dev.examples[-1].label == int(last[1])
    # CoLA train has no header: the first line is data.
    first = (SAMPLE / "glue/CoLA/train.tsv").read_text().split("\n")[0].split("\t")
    assert load_split("cola", "train").examples[0].texts[0] == first[3]


def test_labels_map_to_class_names():
    rte = load_split("rte", "dev")
    spec = get_task("rte")
    raw = [line.split("\t")[3] for line in
           (SAMPLE / "glue/RTE/dev.tsv").read_text().strip("\n").split("\n")[1:]]
    assert [spec.labels[ex.label] for ex in rte.examples] == raw
    stsb = load_split("stsb", "dev")
    scores = [float(line.split("\t")[9]) for line in
              (SAMPLE / "glue/STS-B/dev.tsv").read_text().strip("\n").split("\n")[1:]]
    assert [ex.label for ex in stsb.examples] == scores


def test_conllu_sample_words_and_tags():
    data = load_split("ud_pos", "dev")
    spec = get_task("ud_pos")
    assert len(data) == _sample_counts()["ud_english_ewt/en_ewt-ud-dev.conllu"]
    # Independent count of word lines (integer IDs) from the raw file.
    words = sum(1 for line in (SAMPLE / "ud_english_ewt/en_ewt-ud-dev.conllu").read_text().split("\n")
                if line and not line.startswith("#") and line.split("\t")[0].isdigit())
    assert sum(len(ex.texts) for ex in data.examples) == words
    ex = next(e for e in data.examples if "n't" in e.texts)  # a multiword token "didn't"/"don't"
    assert spec.labels[ex.tags[ex.texts.index("n't")]] == "PART"
    assert all(len(ex.texts) == len(ex.tags) for ex in data.examples)


# ----------------------------------------------------------------------------- full data

def _sources_tables():
    text = (SHARED / "SOURCES.md").read_text()
    files, checks = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`") and cells[0].endswith("`"):
            files[cells[0].strip("`")] = (int(cells[4]), int(cells[5]), cells[6].strip("`"))
        if len(cells) == 5 and cells[2][:1].isdigit():
            checks[(cells[0], cells[1])] = (cells[2], cells[4])
    return files, checks


@needs_shared
def test_every_shared_file_matches_sources_md():
    files, _ = _sources_tables()
    on_disk = {str(p.relative_to(SHARED)) for p in SHARED.rglob("*") if p.is_file()} - {"SOURCES.md"}
    assert on_disk == set(files)
    for rel, (lines, size, sha) in files.items():
        raw = (SHARED / rel).read_bytes()
        assert raw.count(b"\n") == lines, rel
        assert len(raw) == size, rel
        assert hashlib.sha256(raw).hexdigest() == sha, rel


_TASK = {"CoLA": "cola", "SST-2": "sst2", "MRPC": "mrpc", "STS-B": "stsb", "RTE": "rte",
         "WNLI": "wnli", "QNLI": "qnli", "UD EWT": "ud_pos"}


@needs_shared
def test_full_data_row_and_label_counts():
    _, checks = _sources_tables()
    assert len(checks) == 23
    for (task_label, split), (rows, notes) in checks.items():
        spec = get_task(_TASK[task_label])
        data = load_split(spec, split, data_root=SHARED)
        assert len(data) == int(rows.split()[0]), (task_label, split)
        if spec.name == "ud_pos":
            words = int(re.search(r"(\d+) words", rows).group(1))
            assert sum(len(ex.texts) for ex in data.examples) == words
            continue
        pairs = re.findall(r"([a-z_0-9]+):(\d+)", notes)
        if pairs and split != "test":
            got = Counter(spec.raw_labels[ex.label] for ex in data.examples)
            assert got == {k: int(v) for k, v in pairs}, (task_label, split)
        mean = re.search(r"mean (\d\.\d\d)", notes)
        if mean:
            m = sum(ex.label for ex in data.examples) / len(data)
            assert f"{m:.2f}" == mean.group(1)


@needs_shared
def test_glue_dir_argument_reads_an_official_layout(tmp_path):
    # A GLUE directory as download_glue_data.py lays it out: <dir>/CoLA/train.tsv, ...
    shutil.copytree(SHARED / "glue" / "CoLA", tmp_path / "CoLA")
    data = load_split("cola", "dev", dirs={"glue": tmp_path})
    assert len(data) == 1043


# ----------------------------------------------------------------------------- bad input

def _corrupt(tmp_path, rel, line_no, new_line: bytes):
    """Copies a sample GLUE folder to tmp and replaces line `line_no` (1-based)."""
    src = SAMPLE / "glue" / rel
    dst = tmp_path / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    lines = src.read_bytes().split(b"\n")
    lines[line_no - 1] = new_line
    dst.write_bytes(b"\n".join(lines))
    return dst


@pytest.mark.parametrize("task,rel,line,new,reason", [
    ("sst2", "SST-2/train.tsv", 5, b"only one column", "missing_columns"),
    ("sst2", "SST-2/train.tsv", 6, b"a sentence\t1\textra", "extra_columns"),
    ("sst2", "SST-2/train.tsv", 7, b"a fine sentence\t2", "unknown_label"),
    ("sst2", "SST-2/train.tsv", 8, b"   \t1", "empty_text"),
    ("sst2", "SST-2/train.tsv", 9, b"bad \xff\xfe bytes\t1", "invalid_utf8"),
    ("stsb", "STS-B/train.tsv", 4, b"3\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA b.\tC d.\tabc",
     "bad_score"),
    ("stsb", "STS-B/train.tsv", 4, b"3\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA b.\tC d.\tnan",
     "bad_score"),
    ("cola", "CoLA/train.tsv", 3, b"gj04\t1", "missing_columns"),
    ("cola", "CoLA/dev.tsv", 2, b"gj04\t7\t\tA sentence.", "unknown_label"),
])
def test_malformed_row_names_file_and_line(tmp_path, task, rel, line, new, reason):
    path = _corrupt(tmp_path, rel, line, new)
    split = rel.split("/")[1].split(".")[0]
    with pytest.raises(DataError) as err:
        load_split(task, split, dirs={"glue": tmp_path})
    assert err.value.reason == reason
    assert f"{path}:{line}:" in str(err.value) and repr(task) in str(err.value)
    # The skip policy skips that row only and counts it under its reason.
    data = load_split(task, split, dirs={"glue": tmp_path}, on_error="skip")
    full = load_split(task, split)
    assert len(data) == len(full) - 1
    assert data.report.skipped == {reason: 1}
    assert data.report.first[reason] == f"{path}:{line}"


def test_skip_policy_counts_every_reason(tmp_path):
    src = (SAMPLE / "glue/SST-2/dev.tsv").read_bytes().split(b"\n")
    src[3] = b"x"
    src[4] = b"y\t9"
    src[5] = b"z\t9"
    src[6] = b" \t0"
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2/dev.tsv").write_bytes(b"\n".join(src))
    data = load_split("sst2", "dev", dirs={"glue": tmp_path}, on_error="skip")
    assert data.report.skipped == {"missing_columns": 1, "unknown_label": 2, "empty_text": 1}
    assert data.report.rows_read == 150 and len(data) == 146
    assert "skipped 4" in data.report.summary()


def test_header_without_label_column_is_an_error(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2/train.tsv").write_text("sentence\tgrade\na b\t1\n")
    with pytest.raises(DataError, match=r"train.tsv:1: column 'label' \(field 'label'\) not in the header"):
        load_split("sst2", "train", dirs={"glue": tmp_path})


def test_no_examples_is_an_error(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2/train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="no examples"):
        load_split("sst2", "train", dirs={"glue": tmp_path})
    (tmp_path / "SST-2/train.tsv").write_text("sentence\tlabel\na\t5\nb\t6\n")
    with pytest.raises(DataError, match=r"no examples.*unknown_label: 2"):
        load_split("sst2", "train", dirs={"glue": tmp_path}, on_error="skip")


def test_missing_file_names_task_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task 'qnli', split 'train': file not found"):
        load_split("qnli", "train")
    with pytest.raises(ValueError, match=r"no split 'validation'; .*splits: \['train', 'dev', 'test'\]"):
        load_split("cola", "validation")
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_split("cola", "dev", on_error="ignore")


def test_crlf_and_missing_final_newline(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2/dev.tsv").write_bytes(b"sentence\tlabel\r\nfine film\t1\r\nbad film\t0")
    data = load_split("sst2", "dev", dirs={"glue": tmp_path})
    assert [(e.texts[0], e.label) for e in data.examples] == [("fine film", 1), ("bad film", 0)]


# ----------------------------------------------------------------------------- CoNLL-U

CONLLU_OK = """# sent_id = s1
# text = I didn't go.
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdid\tdo\tAUX\tVBD\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
4.1\tgo\tgo\tVERB\tVB\t_\t_\t_\t0:root\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = s2
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_

"""


def _ud(tmp_path, text):
    d = tmp_path / "ud"
    d.mkdir(exist_ok=True)
    (d / "en_ewt-ud-train.conllu").write_text(text)
    return {"ud_english_ewt": d}


def test_conllu_multiword_tokens_and_empty_nodes(tmp_path):
    data = load_split("ud_pos", "train", dirs=_ud(tmp_path, CONLLU_OK))
    spec = get_task("ud_pos")
    assert [ex.texts for ex in data.examples] == [("I", "did", "n't", "go", "."), ("Hi",)]
    assert [spec.labels[t] for t in data.examples[0].tags] == ["PRON", "AUX", "PART", "VERB", "PUNCT"]
    assert data.examples[0].uid == "s1" and data.examples[1].line == 11


@pytest.mark.parametrize("bad,lineno,reason", [
    ("3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_", 6, "bad_conll_line"),         # 9 fields
    ("7\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_", 6, "bad_conll_line"),      # ID out of sequence
    ("3\tn't\tnot\tNEGATION\tRB\t_\t4\tadvmod\t_\t_", 6, "unknown_label"),  # tag not in UPOS
    ("x-y\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_", 4, "bad_conll_line"),            # malformed range
])
def test_broken_conllu_line(tmp_path, bad, lineno, reason):
    lines = CONLLU_OK.split("\n")
    target = {6: 5, 4: 3}[lineno]
    lines[target] = bad
    dirs = _ud(tmp_path, "\n".join(lines))
    with pytest.raises(DataError) as err:
        load_split("ud_pos", "train", dirs=dirs)
    assert err.value.reason == reason and f"en_ewt-ud-train.conllu:{lineno}:" in str(err.value)
    data = load_split("ud_pos", "train", dirs=dirs, on_error="skip")
    assert [ex.uid for ex in data.examples] == ["s2"] and data.report.skipped == {reason: 1}


# ----------------------------------------------------------------------------- CoNLL-2003

CONLL2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O
. . O O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER
"""


def test_conll2003_reader(tmp_path):
    d = tmp_path / "conll"
    d.mkdir()
    (d / "train.txt").write_text(CONLL2003)
    data = load_split("conll2003_ner", "train", dirs={"conll2003": d})
    spec = get_task("conll2003_ner")
    assert [ex.texts for ex in data.examples] == [("EU", "rejects", "German", "call", "."),
                                                  ("Peter", "Blackburn")]
    assert [spec.labels[t] for t in data.examples[0].tags] == ["I-ORG", "O", "I-MISC", "O", "O"]
    (d / "train.txt").write_text(CONLL2003.replace("call NN I-NP O", "call NN I-NP I-XYZ"))
    with pytest.raises(DataError, match=r"train.txt:6: tag 'I-XYZ' is not in the label set"):
        load_split("conll2003_ner", "train", dirs={"conll2003": d})
    (d / "train.txt").write_text(CONLL2003.replace("call NN I-NP O", "call"))
    with pytest.raises(DataError, match=r"train.txt:6: CoNLL-2003 line needs a word and a tag"):
        load_split("conll2003_ner", "train", dirs={"conll2003": d})


# ----------------------------------------------------------------------------- SuperGLUE

def _superglue(tmp_path, folder, rows, split="train"):
    d = tmp_path / "superglue" / folder
    d.mkdir(parents=True, exist_ok=True)
    name = {"train": "train.jsonl", "dev": "val.jsonl", "test": "test.jsonl"}[split]
    (d / name).write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return {"superglue": tmp_path / "superglue"}


def test_boolq_cb_copa(tmp_path):
    dirs = _superglue(tmp_path, "BoolQ", [
        {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": True},
        {"question": "is grass red", "passage": "Grass is green.", "idx": 1, "label": False}])
    data = load_split("boolq", "train", dirs=dirs)
    assert [(e.texts, e.label, e.uid) for e in data.examples] == [
        (("is the sky blue", "The sky is blue."), 1, "0"), (("is grass red", "Grass is green."), 0, "1")]
    dirs = _superglue(tmp_path, "CB", [
        {"premise": "It rained.", "hypothesis": "It was wet.", "label": "entailment", "idx": 0},
        {"premise": "It rained.", "hypothesis": "It was dry.", "label": "contradiction", "idx": 1}])
    assert [e.label for e in load_split("cb", "train", dirs=dirs).examples] == [0, 1]
    dirs = _superglue(tmp_path, "COPA", [
        {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
         "choice2": "He got a hole in his sock.", "question": "cause", "label": 0, "idx": 0}])
    ex = load_split("copa", "train", dirs=dirs).examples[0]
    assert ex.texts == ("The man broke his toe.",) and ex.label == 0
    assert ex.choices == ("because he dropped a hammer on his foot.", "because he got a hole in his sock.")
    dirs = _superglue(tmp_path, "COPA", [
        {"premise": "P.", "choice1": "a", "choice2": "b", "question": "effect", "idx": 3}], split="test")
    test = load_split("copa", "test", dirs=dirs)
    assert test.examples[0].label is None and test.examples[0].choices == ("so a", "so b")


def test_jsonl_errors(tmp_path):
    good = {"question": "q", "passage": "p", "idx": 0, "label": True}
    dirs = _superglue(tmp_path, "BoolQ", [good, "{not json", {"question": "q", "idx": 2, "label": True},
                                          dict(good, label="maybe"), dict(good, passage="")])
    with pytest.raises(DataError, match=r"BoolQ/train.jsonl:2: invalid JSON"):
        load_split("boolq", "train", dirs=dirs)
    data = load_split("boolq", "train", dirs=dirs, on_error="skip")
    assert data.report.skipped == {"bad_json": 1, "missing_columns": 1, "unknown_label": 1,
                                   "empty_text": 1}
    assert data.report.first["missing_columns"].endswith("train.jsonl:3")


# ----------------------------------------------------------------------------- SQuAD

def _squad_doc():
    context = "Normandy is a region in France. The Normans gave their name to it."
    return {"version": "1.1", "data": [{"title": "Normandy", "paragraphs": [{
        "context": context,
        "qas": [{"id": "q1", "question": "In what country is Normandy?",
                 "answers": [{"text": "France", "answer_start": context.index("France")}]},
                {"id": "q2", "question": "Who gave their name to Normandy?",
                 "answers": [{"text": "The Normans", "answer_start": context.index("The Normans")}]}]}]}]}


def test_squad_reader_and_bad_answer(tmp_path):
    d = tmp_path / "squad"
    d.mkdir()
    (d / "train-v1.1.json").write_text(json.dumps(_squad_doc(), indent=1))
    data = load_split("squad", "train", dirs={"squad": d})
    assert [(e.uid, e.answers) for e in data.examples] == [("q1", (("France", 24),)),
                                                           ("q2", (("The Normans", 32),))]
    doc = _squad_doc()
    doc["data"][0]["paragraphs"][0]["qas"][1]["answers"][0]["answer_start"] = 3
    text = json.dumps(doc, indent=1)
    (d / "train-v1.1.json").write_text(text)
    line = text[: text.index('"q2"')].count("\n") + 1
    with pytest.raises(DataError, match=rf"train-v1.1.json:{line}: answer 'The Normans' is not at character 3"):
        load_split("squad", "train", dirs={"squad": d})
    data = load_split("squad", "train", dirs={"squad": d}, on_error="skip")
    assert len(data) == 1 and data.report.skipped == {"bad_answer": 1}
    (d / "train-v1.1.json").write_text('{"data": [\n  {"title": oops}]}')
    with pytest.raises(DataError, match=r"train-v1.1.json:2: invalid JSON"):
        load_split("squad", "train", dirs={"squad": d})


def test_squad_v2_unanswerable_questions(tmp_path):
    """SQuAD 2.0 JSON: questions marked is_impossible have no answers; squad_v2 reads them,
    the v1.1 task refuses them naming the line, and contradictory entries are errors."""
    doc = _squad_doc()
    doc["version"] = "v2.0"
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "q3", "question": "Who ruled France in 2100?", "answers": [],
                "plausible_answers": [{"text": "The Normans", "answer_start": 32}],
                "is_impossible": True})
    text = json.dumps(doc, indent=1)
    line = text[: text.index('"q3"')].count("\n") + 1
    for name, file in (("squad_v2", "train-v2.0.json"), ("squad", "train-v1.1.json")):
        (tmp_path / name).mkdir()
        (tmp_path / name / file).write_text(text)
    data = load_split("squad_v2", "train", dirs={"squad_v2": tmp_path / "squad_v2"})
    assert [(e.uid, e.answers) for e in data.examples][2] == ("q3", ())
    with pytest.raises(DataError, match=rf"train-v1.1.json:{line}: question is marked is_impossible "
                                        rf"\(SQuAD 2.0\), but task 'squad' answers every question"):
        load_split("squad", "train", dirs={"squad": tmp_path / "squad"})
    qas[2]["answers"] = [{"text": "France", "answer_start": 24}]
    (tmp_path / "squad_v2" / "train-v2.0.json").write_text(json.dumps(doc, indent=1))
    with pytest.raises(DataError, match=rf"train-v2.0.json:{line}: question is marked is_impossible but has answers"):
        load_split("squad_v2", "train", dirs={"squad_v2": tmp_path / "squad_v2"})


def test_a_line_that_is_not_utf8_takes_its_whole_record(tmp_path):
    """The skip policy drops the record holding a line that is not UTF-8 (a CoNLL-U sentence,
    a CSV record over several lines), counted among the rows read; before, the line alone
    was dropped: the sentence was kept cut short, the CSV record lost its closing quote."""
    import dataclasses
    from mtlx.data import SplitFile, get_task
    from mtlx.data.tasks import task_from_config
    good = ("# sent_id = s1\n1\tThe\tthe\tDET\tDT\t_\t2\tdet\t_\t_\n"
            "2\tdog\tdog\tNOUN\tNN\t_\t3\tnsubj\t_\t_\n").encode()
    (tmp_path / "x.conllu").write_bytes(
        good + b"3\tbarks\xff\tbark\tVERB\tVBZ\t_\t0\troot\t_\t_\n\n"
        + good.replace(b"s1", b"s2") + b"3\tbarks\tbark\tVERB\tVBZ\t_\t0\troot\t_\t_\n")
    pos = get_task("ud_pos")
    spec = dataclasses.replace(pos, name="ud_x", source=dataclasses.replace(
        pos.source, root=str(tmp_path), files=(SplitFile("train", "x.conllu"),)))
    with pytest.raises(DataError, match=r"x.conllu:4: .*invalid UTF-8 at byte 7"):
        load_split(spec, "train")
    data = load_split(spec, "train", on_error="skip")
    assert [e.texts for e in data.examples] == [("The", "dog", "barks")]
    assert data.report.rows_read == 2 and data.report.skipped == {"invalid_utf8": 1}

    (tmp_path / "y.csv").write_bytes(
        b'text,label\n"first line\nsecond \xff line",a\nnext,b\nthird,a\n')
    csv_spec = task_from_config({"name": "csv_y", "head": "classification", "format": "csv",
                                 "files": {"train": "y.csv"}, "labels": ["a", "b"],
                                 "columns": {"text": "text", "label": "label"},
                                 "root": str(tmp_path)})
    with pytest.raises(DataError, match=r"y.csv:3: .*invalid UTF-8"):
        load_split(csv_spec, "train")
    data = load_split(csv_spec, "train", on_error="skip")
    assert [e.texts[0] for e in data.examples] == ["next", "third"]
    assert data.report.rows_read == 3 and data.report.first["invalid_utf8"].endswith("y.csv:3")

    (tmp_path / "z.tsv").write_bytes(b"text\tlabel\nok\ta\nbad \xff\tb\nfine\tb\n")
    tsv_spec = dataclasses.replace(csv_spec, name="tsv_z", source=dataclasses.replace(
        csv_spec.source, format="tsv", files=(SplitFile("train", "z.tsv"),)))
    data = load_split(tsv_spec, "train", on_error="skip")
    assert len(data) == 2 and data.report.rows_read == 3
