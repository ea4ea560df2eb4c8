"""HyperFormer++ (Karimi Mahabadi et al., ACL 2021) on GLUE with T5-base: one shared hypernetwork
generates every task's adapters (and task-conditional layer norms) from task, layer-id and
block-type embeddings, once per step; each example of a mixed batch gathers its task's weights.

    python scripts/train.py --config configs/glue_hyperformerpp.py --workdir /tmp/hyperformerpp \
        --config.model.checkpoint=/path/to/t5-base --config.data.data_root=/path/to/data \
        --config.data.tokenizer=/path/to/t5-base

The paper's settings: 8 GLUE tasks (no WNLI), reduction factor 32, task/layer/block embeddings
64, hypernetwork hidden 128, lr 3e-4, batch 128, warmup 500, temperature T=10, 65,536 steps.
Differences from the paper, on purpose: heads are classification/regression heads on the
mean-pooled T5 encoder (the paper decodes label words with the T5 decoder), so only the encoder
carries adapters; batches mix tasks (the paper draws one task per batch).
`:local` runs the same experiment with a tiny random T5 on the embedded sample.
"""

from mtlx.train.defaults import base_config, tiny_local

GLUE = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")


def get_config(arg=None):
    c = base_config()
    c.tasks = GLUE
    c.model.family = "t5"
    c.model.config = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                          num_heads=12, feed_forward_proj="relu", tie_word_embeddings=True)
    # decoder=False: the heads read the encoder only, so no decoder adapters are generated.
    c.peft.methods = ({"method": "hyperformer++", "reduction_factor": 32, "task_embedding_dim": 64,
                       "hidden_dim": 128, "decoder": False},)
    c.mixture.strategy = "temperature"
    c.mixture.kwargs = {"temperature": 10.0}
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 500
    c.optim.num_train_steps = 65536
    c.batch_size = 128
    if arg == "local":
        tiny_local(c)
        c.tasks = ("cola", "sst2", "mrpc", "stsb", "rte")
        c.model.config = dict(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                              num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True)
        c.peft.methods = ({"method": "hyperformer++", "reduction_factor": 4,
                           "task_embedding_dim": 8, "hidden_dim": 16, "decoder": False},)
    elif arg not in (None, ""):
        raise ValueError(f"configs/glue_hyperformerpp.py: unknown variant {arg!r}; known: 'local'")
    return c
