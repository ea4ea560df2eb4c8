"""MT-DNN-style multi-task GLUE: one shared BERT-base encoder, one head per task, all weights train.

    python scripts/train.py --config configs/glue_shared_encoder.py --workdir /tmp/glue_shared \
        --config.model.checkpoint=/path/to/bert-base-uncased --config.data.data_root=/path/to/data

data_root holds glue/<Task>/{train,dev}.tsv in the official layout (MNLI, QQP and QNLI train are
not in ../shared/data; list only the tasks you have with --config.tasks=cola,sst2,...).
`:local` runs the same experiment with a tiny model on the embedded sample (CPU, seconds).
"""

from mtlx.train.defaults import base_config, tiny_local

GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")


def get_config(arg=None):
    c = base_config()
    c.tasks = GLUE
    c.model.family = "bert"          # BERT-base architecture (from the checkpoint when given)
    c.optim.learning_rate = 5e-5     # MT-DNN: 5e-5, batch 32, warmup 10%
    c.optim.num_train_steps = 30000
    c.optim.warmup_steps = 3000
    c.mixture.strategy = "proportional"
    c.mixture.kwargs = {}
    if arg == "local":
        tiny_local(c)
        c.tasks = ("cola", "sst2", "mrpc", "stsb", "rte")
        c.model.config.update(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    elif arg not in (None, ""):
        raise ValueError(f"configs/glue_shared_encoder.py: unknown variant {arg!r}; known: 'local'")
    return c
