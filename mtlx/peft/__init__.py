"""Parameter-efficient multi-task modules, routed per example in mixed-task batches.

Every method attaches to a backbone through the extension hooks of mtlx.models.layers and
keeps one set of weights per task, keyed by task name; inside one forward pass each example
uses its own task's weights (mtlx.peft.routing). Methods are built from configuration by
name (mtlx.peft.registry):

    from mtlx.peft import registry
    cfg = registry.attach(bert_cfg, [{'method': 'lora', 'rank': 8, 'alpha': 16},
                                     {'method': 'adapter', 'variant': 'pfeiffer'}],
                          task_names=model_task_names)
    trainable = registry.trainable_patterns(cfg.extensions)   # for optim.trainable_mask

  adapters   Houlsby / Pfeiffer / parallel bottleneck adapters, task-conditional LayerNorm
  lora       LoRA with exact merge/unmerge
  prompt     prefix tuning (attention keys/values) and prompt tuning (input embeddings)
  compacter  Compacter (PHM layers with shared Kronecker rules)
  ia3        (IA)^3 rescaling of keys, values and FFN activations
  fusion     AdapterFusion over several tasks' adapters
  peft_io    LoRA export to / import from Hugging Face PEFT's on-disk format
"""
