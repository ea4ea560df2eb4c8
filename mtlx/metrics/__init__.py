"""Host-side (numpy) evaluation metrics, a registry by name, and streaming accumulation.

Modules: classification (accuracy, F1, MCC, multi-label F1), correlation (Pearson, Spearman),
sequence (token accuracy, entity F1), qa (SQuAD v1.1 and 2.0 EM/F1), glue (per-task GLUE scores and
the GLUE average), multitask (delta_p), registry (METRICS, get_metric), accumulator
(MetricAccumulator), report (metrics tables). All values are fractions in [0, 1] except
delta_p, a percentage.
"""

from mtlx.metrics.accumulator import MetricAccumulator
from mtlx.metrics.classification import accuracy, binary_f1, matthews_corrcoef, multilabel_f1
from mtlx.metrics.correlation import pearson, rankdata, spearman
from mtlx.metrics.glue import GLUE_TASK_METRICS, glue_average, glue_score
from mtlx.metrics.multitask import delta_p
from mtlx.metrics.registry import METRICS, Metric, get_metric
from mtlx.metrics.report import format_metrics_table, print_metrics_table
from mtlx.metrics.sequence import entity_counts, entity_f1, extract_entities, token_accuracy
from mtlx.metrics.qa import normalize_answer, squad, squad_v2

__all__ = [
    "MetricAccumulator", "accuracy", "binary_f1", "matthews_corrcoef", "multilabel_f1",
    "pearson", "rankdata", "spearman", "GLUE_TASK_METRICS", "glue_average", "glue_score",
    "delta_p", "METRICS", "Metric", "get_metric", "format_metrics_table", "print_metrics_table",
    "entity_counts", "entity_f1", "extract_entities", "token_accuracy", "normalize_answer",
    "squad", "squad_v2",
]
