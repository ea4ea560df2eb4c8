"""The base ConfigDict every config in configs/ starts from; every field is commented.

Configs override what differs (`c = base_config(); c.tasks = (...)`), so a field exists in one
place and the override checker (mtlx.train.config) knows every key.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                       # everything random derives from it (init, dropout, data order)
    # Registered task names (mtlx.data.list_tasks()) or dicts declaring a task from a file.
    c.tasks = ("cola", "sst2")
    # Per-task settings changed for this run, "task.field=value" entries (comma-separated on the
    # command line): stride (tagging: windows of long sentences instead of cutting them; span:
    # context windows), truncation, null_answers, null_score_threshold (span tasks), e.g.
    # --config.task_overrides=ud_pos.stride=32,squad_v2.null_score_threshold=-1.5
    c.task_overrides = ()
    c.text_to_text = False           # T5 backbones: every classification / regression task in
                                     # its text-to-text form (mtlx.data.text_to_text), trained on
                                     # target text, scored on generated text (c.generation)
    # How text-to-text / seq2seq tasks are decoded for evaluation and scripts/predict.py
    # (mtlx.models.t5): greedy with num_beams=1, else beam search as transformers' generate
    # does it (length_penalty: scores divided by length ** it; early_stopping: 'false' =
    # transformers' False (stop when no running beam can beat the finished ones at its
    # length), 'true' (stop once num_beams hypotheses finished), 'never' (at max length)).
    c.generation = ml_collections.ConfigDict({"num_beams": 1, "length_penalty": 1.0,
                                              "early_stopping": "false"})

    c.data = ml_collections.ConfigDict()
    c.data.data_root = None          # None: the sample shipped in mtlx/data/sample; else a folder
                                     # with glue/<Task>/*.tsv and ud_english_ewt/*.conllu (a
                                     # gs:// URL is copied to a local cache: mtlx.paths)
    c.data.tokenizer = None          # None: the bert-base-uncased vocab in the sample; else a
                                     # vocab file or a tokenizer directory (local or gs://)
    c.data.max_length = 128          # truncation length (tokens)
    c.data.buckets = (64, 128)       # static padded lengths: one compilation per bucket
    c.data.on_error = "raise"        # or 'skip': skip malformed rows and report counts
    c.data.packing = False           # training rows of the longest bucket, several examples of
                                     # one task each (mtlx.data.packing; BERT/RoBERTa/T5, heads
                                     # classification/regression/tagging); eval unpacked;
                                     # perf/examples_per_s counts the examples in the rows
    c.data.packing_max_segments = 8  # at most this many examples a packed row
    c.data.packing_mix_tasks = False  # packed rows may hold examples of several tasks (fuller
                                      # rows; adapters/LoRA/hypernetworks/tagging heads route
                                      # per token; prompt/prefix tuning refuse it)

    c.mixture = ml_collections.ConfigDict()
    c.mixture.strategy = "temperature"   # proportional|uniform|temperature|annealed|round_robin
    c.mixture.kwargs = ml_collections.ConfigDict({"temperature": 2.0})
    c.mixture.mixed = True           # mixed-task batches (False: one task per batch)

    c.model = ml_collections.ConfigDict()
    c.model.family = "bert"          # bert | t5 (used when no checkpoint is given)
    c.model.checkpoint = None        # a Hugging Face model directory (config.json + weights),
                                     # local or gs:// (copied to a local cache: mtlx.paths)
    c.model.config = ml_collections.ConfigDict(dict(   # architecture when training from scratch
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2))
    c.model.dtype = "float32"        # compute dtype; 'bfloat16' keeps fp32 master weights
    c.model.frozen_dtype = None      # 'bfloat16' (= dtype): frozen kernels stored in it, not
                                     # cast every step (PEFT: half the backbone's memory)
    c.model.attention_impl = None    # None|'xla'|'cudnn'
    c.model.remat = "none"           # activation checkpointing per layer/block
                                     # (none|full|dots|dots_no_batch; mtlx.models.remat)
    c.model.scan_layers = False      # the layers as one lax.scan (compile time independent
                                     # of depth; BERT/RoBERTa: mtlx/models/bert.py, T5: layers
                                     # 1.. of each stack, mtlx/models/t5.py)
    c.model.head_dropout = 0.1
    c.model.hidden_dropout = None    # override the backbone's dropout (None: keep)

    c.peft = ml_collections.ConfigDict()
    c.peft.methods = ()              # e.g. ({'method': 'adapter', 'variant': 'houlsby'},)
    c.trainable = ()                 # regexes over parameter paths that train; () = the default:
                                     # everything, or with PEFT methods their own parameters +
                                     # heads + layer norms; ('.*',) trains everything always

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"      # adamw | adafactor | sgd
    c.optim.learning_rate = 2e-5
    c.optim.warmup_steps = 500
    c.optim.num_train_steps = 20000
    c.optim.schedule = "linear"      # constant | linear | cosine (after warmup)
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0
    c.optim.accum_steps = 1          # gradient accumulation microbatches per step

    c.batch_size = 32                # global batch (all processes together)
    c.stack_state = "auto"           # auto|on|off: the train state's small same-shaped leaves
                                     # (many tasks' adapters, heads, their optimizer moments)
                                     # pass the step's jit boundary as a few stacked arrays
                                     # (mtlx.train.stacking); 'auto': from 1,024 leaves on.
                                     # Same values; less host work a step, longer compile
    c.task_weights = None            # static per-task loss weights (None = 1 each)

    # Task balancing (mtlx.weighting; REFERENCE.md section 3). See mtlx/train/step.py.
    c.weighting = ml_collections.ConfigDict()
    c.weighting.strategy = None      # None: static c.task_weights (None = EW). A registry name:
                                     # static ew uw dwa rlw gls famo (one backward); gradnorm mgda
                                     # pcgrad cagrad nash_mtl imtl_g aligned_mtl db_mtl (per task)
    c.weighting.kwargs = ml_collections.ConfigDict()  # the strategy's hyperparameters, e.g.
                                     # {'steps_per_epoch': 500} for dwa, {'calpha': 0.5} cagrad,
                                     # {'after': 'same_batch'} for LibMTL's FAMO update
    c.weighting.grads_wrt = "params"  # per-task strategies: 'params' (gradients of the shared
                                     # parameters, T x D memory) or 'representation' (of the
                                     # shared representation, LibMTL rep_grad: far cheaper)
    c.weighting.representation = "hidden"  # with grads_wrt='representation': 'hidden' (the
                                     # encoder's last hidden state, every head reads it) or
                                     # 'pooled' (sequence-level tasks only)
    c.weighting.sequential = False   # per-task backward passes one at a time (lax.map), not
                                     # batched (vmap); see step.py for its measured memory
    c.weighting.learning_rate = 1e-3  # Adam lr of the strategy's own trainable parameters
                                     # (UW log-variances, GradNorm scales, IMTL-L scales)
    c.weighting.report = ml_collections.ConfigDict()
    c.weighting.report.enabled = True     # each evaluation: log task weights, gradient cosines
                                     # and lookahead affinity; at the end write workdir/affinity/
    c.weighting.report.lookahead_lr = None  # SGD step of the lookahead (TAG); None = the
                                     # peak c.optim.learning_rate
    c.weighting.report.num_groups = (2, 3)  # suggested groupings into this many groups
    c.weighting.report.max_exhaustive = 250000  # partitions searched exhaustively, else greedy
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.log_every = 50                 # steps between train-metric logs
    c.eval_every = 1000              # steps between evaluations (and the end)
    c.eval_batch_size = 64
    c.eval_max_batches = None        # cap evaluation batches per task (None = whole split)
    c.checkpoint = ml_collections.ConfigDict({
        "every": 1000,               # steps between checkpoints (and at the end, and on SIGTERM)
        "keep_last": 2,              # the most recent checkpoints kept
        "best_metric": "avg",        # also keep the best by this: 'avg' or 'TASK/METRIC'
        "best_mode": "max",          # 'max' or 'min' (e.g. for 'stsb/loss')
    })
    c.allow_new_tasks = False        # resume a workdir whose checkpoint lacks some tasks

    # Multi-host (see README): explicit coordinator, or distributed='auto' on TPU/SLURM.
    c.distributed = "none"
    c.coordinator_address = None
    c.num_processes = None
    c.process_id = None
    return c


def tiny_local(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ':local' variant of any config: same experiment, tiny model, a few steps, CPU."""
    c.optim.num_train_steps = 6
    c.optim.warmup_steps = 2
    c.optim.learning_rate = 1e-3
    c.log_every = 2
    c.eval_every = 6
    c.eval_max_batches = 1
    c.checkpoint.every = 3
    c.batch_size = 16
    c.data.data_root = None
    c.data.max_length = 64
    c.data.buckets = (32, 64)
    c.model.checkpoint = None
    return c
