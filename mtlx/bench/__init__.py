"""Benchmarking mtlx against a PyTorch Hugging Face (+ PEFT) baseline (scripts/bench.py).

  workload        sizes, configurations, features, synthetic batches, the mtlx side of a cell
  flops           analytic model FLOPs per training step (what is and is not counted)
  peaks           peak FLOP/s by device kind (datasheet), or measured on a CPU
  memory          compiled-step, device-allocator and sampled-RSS memory figures
  torch_baseline  the same model and tasks in PyTorch: HF BertModel, PEFT LoRA, a Houlsby
                  adapter and HyperFormer++ written as their users write them (one task a batch)
  harness         timing (warm-up excluded, synchronised, A/B interleaved, medians), compile
                  time and count, feature on/off measurements, results as one JSON-able dict
  report          the results table (text / Markdown) and the tasks-scaling plot
  checks          correctness checks run before GPU benchmarks (bf16 vs float32, cuDNN vs XLA)
"""
