"""The main job: a tiny multi-task BERT on the real GLUE + UD sample shipped in the package.

    python scripts/train.py --config configs/demo.py --workdir /tmp/mtlx_demo

Six tasks (CoLA, SST-2, MRPC, STS-B, RTE, UD POS tagging) with classification, regression and
token-classification heads, trained in one compiled step on mixed-task batches. The encoder is
randomly initialised (no pretrained weights can be downloaded here); point it at a local
Hugging Face checkpoint and full data with two flags:

    python scripts/train.py --config configs/demo.py --workdir /tmp/run \
        --config.model.checkpoint=/path/to/bert-base-uncased --config.data.data_root=/path/to/data

`:local` is an even smaller variant for smoke tests (a few steps). Every field is documented in
mtlx/train/defaults.py.
"""

from mtlx.train.defaults import base_config, tiny_local


def get_config(arg=None):
    c = base_config()
    c.tasks = ("cola", "sst2", "mrpc", "stsb", "rte", "ud_pos")
    c.data.max_length = 64
    c.data.buckets = (32, 64)
    c.model.config.update(dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512))
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 30
    c.optim.num_train_steps = 300
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint.every = 100
    if arg == "local":
        tiny_local(c)
        c.model.config.update(dict(hidden_size=32, intermediate_size=64, num_layers=1))
    elif arg not in (None, ""):
        raise ValueError(f"configs/demo.py: unknown variant {arg!r}; known: 'local'")
    return c
