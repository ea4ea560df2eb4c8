"""The main job: a tiny multi-task BERT on the real GLUE + UD sample shipped in the package.

    python scripts/train.py --config configs/demo.py --workdir /tmp/mtlx_demo

Six tasks (CoLA, SST-2, MRPC, STS-B, RTE, UD POS tagging) with classification, regression and
token-classification heads, trained in one compiled step on mixed-task batches. The encoder is
randomly initialised (no pretrained weights can be downloaded here); point it at a local
Hugging Face checkpoint and full data with two flags:

    python scripts/train.py --config configs/demo.py --workdir /tmp/run \
        --config.model.checkpoint=/path/to/bert-base-uncased --config.data.data_root=/path/to/data

`:local` is an even smaller variant for smoke tests (a few steps).
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0                       # everything random derives from it (init, dropout, data order)
    # Registered task names (mtlx.data.list_tasks()) or dicts declaring a task from a file.
    c.tasks = ("cola", "sst2", "mrpc", "stsb", "rte", "ud_pos")

    c.data = ml_collections.ConfigDict()
    c.data.data_root = None          # None: the sample shipped in mtlx/data/sample; else a folder
                                     # with glue/<Task>/*.tsv and ud_english_ewt/*.conllu
    c.data.tokenizer = None          # None: the bert-base-uncased vocab in the sample
    c.data.max_length = 64           # truncation length (tokens)
    c.data.buckets = (32, 64)        # static padded lengths: one compilation per bucket
    c.data.on_error = "raise"        # or 'skip': skip malformed rows and report counts

    c.mixture = ml_collections.ConfigDict()
    c.mixture.strategy = "temperature"   # proportional|uniform|temperature|annealed|round_robin
    c.mixture.kwargs = ml_collections.ConfigDict({"temperature": 2.0})
    c.mixture.mixed = True           # mixed-task batches (False: one task per batch)

    c.model = ml_collections.ConfigDict()
    c.model.family = "bert"          # bert | t5 (used when no checkpoint is given)
    c.model.checkpoint = None        # a local Hugging Face model directory (config.json + weights)
    c.model.config = ml_collections.ConfigDict(dict(   # architecture when training from scratch
        vocab_size=30522, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
        max_position_embeddings=512, type_vocab_size=2))
    c.model.dtype = "float32"        # compute dtype; 'bfloat16' keeps fp32 master weights
    c.model.attention_impl = None    # None|'xla'|'cudnn'
    c.model.head_dropout = 0.1

    c.peft = ml_collections.ConfigDict()
    c.peft.methods = ()              # e.g. ({'method': 'houlsby', 'reduction_factor': 16},)
    c.trainable = ()                 # regexes over parameter paths; () = everything trains

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"      # adamw | adafactor | sgd
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 30
    c.optim.num_train_steps = 300
    c.optim.schedule = "linear"      # constant | linear | cosine (after warmup)
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0
    c.optim.accum_steps = 1          # gradient accumulation microbatches per step

    c.batch_size = 32                # global batch (all processes together)
    c.task_weights = None            # static per-task loss weights (None = 1 each)
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.log_every = 10
    c.eval_every = 100
    c.eval_batch_size = 64
    c.eval_max_batches = None        # cap evaluation batches per task (None = whole split)
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep_last": 2})
    c.allow_new_tasks = False        # resume a workdir whose checkpoint lacks some tasks

    # Multi-host (see README): explicit coordinator, or distributed='auto' on TPU/SLURM.
    c.distributed = "none"
    c.coordinator_address = None
    c.num_processes = None
    c.process_id = None

    if arg == "local":
        c.optim.num_train_steps = 6
        c.optim.warmup_steps = 2
        c.log_every = 2
        c.eval_every = 6
        c.eval_max_batches = 1
        c.checkpoint.every = 3
        c.batch_size = 16
        c.model.config.hidden_size = 32
        c.model.config.intermediate_size = 64
        c.model.config.num_layers = 1
    elif arg not in (None, ""):
        raise ValueError(f"configs/demo.py: unknown variant {arg!r}; known: 'local'")
    return c
