"""CoNLL readers: CoNLL-U (Universal Dependencies) and CoNLL-2003 (NER), one Example per sentence.

CoNLL-U (https://universaldependencies.org/format.html): sentences separated by blank lines,
comment lines start with "#", each word line has 10 tab-separated fields
(ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC). Multiword-token lines ("1-2") and empty
nodes ("8.1") are not syntactic words and carry no tag for tagging: they are skipped, as UD's
own evaluation of UPOS does. Word IDs must run 1, 2, 3, ... within a sentence.

CoNLL-2003 (Tjong Kim Sang & De Meulder 2003): "word POS chunk NER" per line, blank lines
between sentences, "-DOCSTART-" lines between documents. The tag is the last column; the
original IOB1 tags are kept as they are.

A bad line makes its whole sentence bad: under the skip policy the sentence is skipped (counted
once, with the first bad line) and reading resumes after the next blank line.
"""

from __future__ import annotations

from pathlib import Path

from mtlx.data.errors import RowErrors
from mtlx.data.readers import Example, Undecodable, decoded_lines
from mtlx.data.tasks import TaskSpec

CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")


def read(spec: TaskSpec, entry, path: Path, errors: RowErrors) -> list:
    if spec.source.format == "conllu":
        parse = _conllu_sentence(spec)
    elif spec.source.format == "conll2003":
        parse = _conll2003_sentence(spec)
    else:
        raise ValueError(f"not a CoNLL format: {spec.source.format!r}")
    examples = []
    for start, block in _sentences(decoded_lines(path, errors), spec.source.format):
        errors.report.rows_read += 1
        bad = next((text for _, text in block if isinstance(text, Undecodable)), None)
        if bad is not None:  # the whole sentence is bad, not just its line
            errors.bad("invalid_utf8", bad.message, line=bad.line)
            continue
        try:
            ex = parse(start, block)
        except _BadLine as bad:
            errors.bad(bad.reason, bad.message, line=bad.line)
            continue
        if ex is not None:
            examples.append(ex)
    return examples


class _BadLine(Exception):
    def __init__(self, reason: str, message: str, line: int):
        super().__init__(message)
        self.reason, self.message, self.line = reason, message, line


def _sentences(lines, fmt: str):
    """Groups (line, text) into sentences: yields (first line, [(line, text), ...])."""
    block = []
    for line, text in lines:
        plain = text.text if isinstance(text, Undecodable) else text
        if not plain.strip():
            if block:
                yield block[0][0], block
            block = []
            continue
        if fmt == "conll2003" and plain.startswith("-DOCSTART-"):
            if block:
                yield block[0][0], block
            block = []
            continue
        block.append((line, text))
    if block:
        yield block[0][0], block


def _conllu_sentence(spec: TaskSpec):
    tag_field = CONLLU_FIELDS.index(spec.source.tag_column)
    labels = {t: i for i, t in enumerate(spec.labels)}

    def parse(start: int, block) -> Example:
        words, tags, sent_id = [], [], ""
        for line, text in block:
            if text.startswith("#"):
                if text.startswith("# sent_id") and "=" in text:
                    sent_id = text.split("=", 1)[1].strip()
                continue
            cols = text.split("\t")
            if len(cols) != 10:
                raise _BadLine("bad_conll_line", f"CoNLL-U word line needs 10 tab-separated "
                               f"fields, found {len(cols)}", line)
            wid = cols[0]
            if "-" in wid or "." in wid:  # multiword token / empty node
                if not all(p.isdigit() for p in wid.replace("-", ".").split(".")):
                    raise _BadLine("bad_conll_line", f"malformed ID {wid!r}", line)
                continue
            if not wid.isdigit() or int(wid) != len(words) + 1:
                raise _BadLine("bad_conll_line", f"word ID {wid!r} out of sequence "
                               f"(expected {len(words) + 1})", line)
            form, tag = cols[1], cols[tag_field]
            if not form.strip():
                raise _BadLine("empty_text", "empty FORM", line)
            if tag not in labels:
                raise _BadLine("unknown_label", f"{spec.source.tag_column.upper()} tag {tag!r} is "
                               f"not in the label set {list(spec.labels)}", line)
            words.append(form)
            tags.append(labels[tag])
        if not words:
            raise _BadLine("bad_conll_line", "sentence has comments but no word lines", start)
        return Example(texts=tuple(words), tags=tuple(tags), uid=sent_id, line=start)

    return parse


def _conll2003_sentence(spec: TaskSpec):
    labels = {t: i for i, t in enumerate(spec.labels)}

    def parse(start: int, block) -> Example:
        words, tags = [], []
        for line, text in block:
            cols = text.split()
            if len(cols) < 2:
                raise _BadLine("bad_conll_line", "CoNLL-2003 line needs a word and a tag "
                               f"(word POS chunk NER), found {len(cols)} field(s)", line)
            if cols[-1] not in labels:
                raise _BadLine("unknown_label", f"tag {cols[-1]!r} is not in the label set "
                               f"{list(spec.labels)}", line)
            words.append(cols[0])
            tags.append(labels[cols[-1]])
        return Example(texts=tuple(words), tags=tuple(tags), line=start)

    return parse
