"""tensorflow-datasets source without TensorFlow: tiny ArrayRecord datasets are prepared here
with a local builder that mirrors tfds' own `glue` features (Text fields, ClassLabel with tfds'
label names, `idx`), filled with rows of the embedded real sample, then read back through
`load_split(..., backend="tfds")` and compared with the TSV reader. The real `glue` builder
itself is not run (it downloads)."""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mtlx.data import DataError, load_split  # noqa: E402
from mtlx.data.tasks import get_task  # noqa: E402


def _prepare(data_dir, config, features, splits):
    """Prepares glue/<config> 2.0.0 as ArrayRecord in data_dir from {split: [rows]}."""
    from tensorflow_datasets.core import registered

    with registered.skip_registration():
        class Glue(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("2.0.0")
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)]

            def _info(self):
                return tfds.core.DatasetInfo(builder=self,
                                             features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {name: self._generate_examples(rows) for name, rows in splits.items()}

            def _generate_examples(self, rows):
                for i, row in enumerate(rows):
                    yield i, dict(row, idx=i)

    Glue(config=config, data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_glue_cola_from_tfds_equals_tsv(tmp_path):
    dev = load_split("cola", "dev").examples
    test = load_split("cola", "test").examples
    features = {"sentence": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["unacceptable", "acceptable"]),
                "idx": np.int32}
    _prepare(tmp_path, "cola", features, {
        "validation": [{"sentence": e.texts[0], "label": e.label} for e in dev],
        "test": [{"sentence": e.texts[0], "label": -1} for e in test]})
    got = load_split("cola", "dev", backend="tfds", tfds_data_dir=tmp_path)
    # tfds shuffles records when it writes them; `idx` (kept as the uid) gives the file order.
    in_order = sorted(got.examples, key=lambda e: int(e.uid))
    assert [(e.texts, e.label) for e in in_order] == [(e.texts, e.label) for e in dev]
    assert got.path == "tfds:glue/cola/validation" and got.report.num_skipped == 0
    unlabelled = load_split("cola", "test", backend="tfds", tfds_data_dir=tmp_path)
    assert len(unlabelled) == len(test) and all(e.label is None for e in unlabelled.examples)


def test_labels_are_matched_by_name_and_regression(tmp_path):
    # A dataset whose ClassLabel order differs from the task's must not permute the classes.
    rte = load_split("rte", "dev").examples[:20]
    spec = get_task("rte")
    features = {"sentence1": tfds.features.Text(), "sentence2": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=["not_entailment", "entailment"]),
                "idx": np.int32}
    _prepare(tmp_path, "rte", features, {"validation": [
        {"sentence1": e.texts[0], "sentence2": e.texts[1],
         "label": ["not_entailment", "entailment"].index(spec.labels[e.label])} for e in rte]})
    got = sorted(load_split("rte", "dev", backend="tfds", tfds_data_dir=tmp_path).examples,
                 key=lambda e: int(e.uid))
    assert [(e.texts, e.label) for e in got] == [(e.texts, e.label) for e in rte]
    stsb = load_split("stsb", "dev").examples[:10]
    _prepare(tmp_path, "stsb", {"sentence1": tfds.features.Text(), "sentence2": tfds.features.Text(),
                                "label": np.float32, "idx": np.int32},
             {"validation": [{"sentence1": e.texts[0], "sentence2": e.texts[1], "label": e.label}
                             for e in stsb]})
    got = sorted(load_split("stsb", "dev", backend="tfds", tfds_data_dir=tmp_path).examples,
                 key=lambda e: int(e.uid))
    np.testing.assert_allclose([e.label for e in got], [e.label for e in stsb], rtol=1e-6)


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"tfds dataset 'glue/sst2' split 'train' is not available "
                                        r"in .*prepare it first \(tfds build glue/sst2 "
                                        r"--file_format=array_record\)"):
        load_split("sst2", "train", backend="tfds", tfds_data_dir=tmp_path)
    with pytest.raises(ValueError, match="has no tensorflow-datasets source"):
        load_split("ud_pos", "train", backend="tfds", tfds_data_dir=tmp_path)
    with pytest.raises(ValueError, match="backend must be 'files' or 'tfds'"):
        load_split("sst2", "train", backend="hub")
