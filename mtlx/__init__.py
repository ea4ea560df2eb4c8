"""mtlx: multi-task learning for transformer NLP in JAX/Flax.

The data path, one package folder per stage:
  mtlx.data      task registry -> readers -> tokenization -> mixtures -> batches
  mtlx.models    encoders (BERT, RoBERTa, T5), task heads, the multi-task model
  mtlx.peft      adapters, LoRA, prefix/prompt tuning, hypernetworks
  mtlx.train     the compiled, sharded step; checkpoints; the loop
  mtlx.weighting loss weighting and gradient balancing strategies
  mtlx.metrics   official task metrics
"""

__version__ = "0.1.0"
