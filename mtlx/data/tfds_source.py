"""tensorflow-datasets as a source, without TensorFlow: prepared ArrayRecord data read through
`tfds.data_source` (random access, decoded with NumPy; REFERENCE.md section 7).

A task's `Source.tfds` names the dataset (``glue/cola``), the split names and which features
hold which text field. Class labels are matched BY NAME against the tfds ClassLabel names, so a
different label order in tfds can never silently permute the classes; tfds writes -1 for the
labels of test splits, which become unlabelled examples. tfds stores records shuffled (it
reorders them when preparing), so examples come in the stored order; GLUE's `idx` feature is kept
as each example's uid.

Nothing is downloaded: the dataset must already be prepared (``tfds build glue/cola
--file_format=array_record`` on a machine with network access, or the builder's
`download_and_prepare(file_format="array_record")`). A dataset that is missing, or prepared as
TFRecord (readable only with TensorFlow), is reported with what to do.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from mtlx.data.errors import DataError, RowErrors
from mtlx.data.readers import SplitData, make_example
from mtlx.data.tasks import TaskSpec


def _open(name: str, split: str, data_dir: Optional[str], task: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("tensorflow-datasets is not installed (pip install 'mtlx[data]'); read "
                        "the task from its files instead (backend='files')", task=task) from None
    where = data_dir or "the default tfds data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises DatasetNotFoundError, AssertionError, ValueError...
        text = str(e).split("\n")[0]
        hint = ("it is prepared as TFRecord, which needs TensorFlow; rebuild it with "
                "file_format='array_record'" if "array_record" in text.lower() or
                "file_format" in text.lower() else
                f"prepare it first (tfds build {name} --file_format=array_record) or read the "
                f"task from its files (backend='files')")
        raise DataError(f"tfds dataset {name!r} split {split!r} is not available in {where}: "
                        f"{text}; {hint}", task=task) from None


def read_tfds(spec: TaskSpec, split: str, *, data_dir=None, on_error: str = "raise") -> SplitData:
    """Reads one split of `spec` from its prepared tensorflow-datasets version."""
    tf = spec.source.tfds
    if tf is None:
        raise ValueError(f"task {spec.name!r} has no tensorflow-datasets source")
    tfds_split = tf.split_name(split)
    labelled_split = spec.source.file(split).labelled if split in spec.splits else True
    source = _open(tf.name, tfds_split, str(data_dir) if data_dir else None, spec.name)
    location = f"tfds:{tf.name}/{tfds_split}"
    errors = RowErrors(on_error, location, spec.name)
    fields = dict(tf.fields)
    names = _label_names(source, tf.label_feature)
    if names is not None and spec.labels:
        unknown = [n for n in names if n not in spec.labels]
        if unknown:
            raise DataError(f"tfds label names {unknown} are not in the task's labels "
                            f"{list(spec.labels)}", path=location, task=spec.name)
    examples = []
    for i in range(len(source)):
        errors.report.rows_read += 1
        row = source[i]
        where = f"{tfds_split}[{i}]"
        record = {}
        bad = False
        for field in spec.text_fields:
            value = row.get(fields.get(field, field))
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    errors.bad("invalid_utf8", f"feature {fields.get(field, field)!r}: invalid "
                               f"UTF-8 at byte {e.start}", where=where)
                    bad = True
                    break
            record[field] = value
        if bad:
            continue
        raw = row.get(tf.label_feature)
        labelled = labelled_split and raw is not None and not (
            spec.head != "regression" and int(raw) < 0)
        if labelled:
            if spec.head == "regression":
                record["label"] = float(raw) if raw is not None and math.isfinite(float(raw)) else raw
            else:
                record["label"] = names[int(raw)] if names is not None else int(raw)
        if "idx" in row:
            record["id"] = int(row["idx"])
        spec_for_labels = spec if names is None else _by_name(spec)
        ex = make_example(spec_for_labels, record, labelled, errors, where=where)
        if ex is not None:
            examples.append(ex)
    report = errors.finish(len(examples))
    return SplitData(spec, split, examples, report, location, labelled_split)


def _label_names(source, feature: str):
    try:
        info = source.dataset_info.features[feature]
    except (AttributeError, KeyError, TypeError):
        return None
    return list(getattr(info, "names", None) or []) or None


def _by_name(spec: TaskSpec) -> TaskSpec:
    """The spec with raw labels = class names (tfds labels are matched by name)."""
    return dataclasses.replace(spec, source=dataclasses.replace(spec.source, raw_labels=spec.labels))


__all__ = ["read_tfds"]

