"""Multi-task GLUE with per-task Houlsby adapters on a frozen BERT-base (AdapterHub-style), trained
on MIXED-task batches: each example routes through its own task's adapters in one step.

    python scripts/train.py --config configs/glue_adapters.py --workdir /tmp/glue_adapters \
        --config.model.checkpoint=/path/to/bert-base-uncased --config.data.data_root=/path/to/data

What trains: the adapters, the task heads and the backbone's layer norms (the PEFT default,
mtlx.peft.registry.trainable_patterns). Adapter settings follow Houlsby et al. (2019):
two adapters per layer, reduction factor 16, lr 1e-4.
`:local` runs the same experiment with a tiny model on the embedded sample.
"""

from mtlx.train.defaults import base_config, tiny_local

GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")


def get_config(arg=None):
    c = base_config()
    c.tasks = GLUE
    c.peft.methods = ({"method": "adapter", "variant": "houlsby", "reduction_factor": 16},)
    c.optim.learning_rate = 1e-4
    c.optim.num_train_steps = 30000
    c.optim.warmup_steps = 1000
    if arg == "local":
        tiny_local(c)
        c.tasks = ("cola", "sst2", "mrpc", "stsb", "rte")
        c.model.config.update(dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
        c.peft.methods = ({"method": "adapter", "variant": "houlsby", "reduction_factor": 4},)
    elif arg not in (None, ""):
        raise ValueError(f"configs/glue_adapters.py: unknown variant {arg!r}; known: 'local'")
    return c
