"""Multi-host start-up and per-process feeding.

`initialize(cfg)` starts JAX's distributed runtime when the run spans several processes:
  - explicit: cfg.coordinator_address + cfg.num_processes + cfg.process_id (or the environment
    variables MTLX_COORDINATOR_ADDRESS, MTLX_NUM_PROCESSES, MTLX_PROCESS_ID);
  - TPU pod slices and SLURM: cfg.distributed = 'auto' lets `jax.distributed.initialize()`
    detect the cluster (TPU metadata, SLURM_* variables);
  - otherwise single process, nothing to do.
On CPU (tests, CI) collectives go through gloo.

Each process feeds ONLY its own rows of the global batch (`process_slice`), and
`global_batch` assembles the global, sharded jax.Array from the local numpy rows.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

from mtlx.train.sharding import batch_sharding


def initialize(cfg: Optional[Any] = None) -> bool:
    """Starts the distributed runtime if asked for; returns True when multi-process."""
    get = (lambda k, d=None: cfg.get(k, d)) if cfg is not None else (lambda k, d=None: d)
    addr = get("coordinator_address") or os.environ.get("MTLX_COORDINATOR_ADDRESS")
    mode = get("distributed", None) or os.environ.get("MTLX_DISTRIBUTED")
    if addr:
        n = get("num_processes") or os.environ.get("MTLX_NUM_PROCESSES")
        pid = get("process_id")
        pid = pid if pid is not None else os.environ.get("MTLX_PROCESS_ID")
        if n is None or pid is None:
            raise ValueError("config.coordinator_address is set, so config.num_processes and "
                             "config.process_id (or MTLX_NUM_PROCESSES / MTLX_PROCESS_ID) are needed")
        # Only the CPU client reads this (GPU/TPU use NCCL/ICI); it must be set before the
        # backend starts, so it cannot depend on jax.default_backend().
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=addr, num_processes=int(n), process_id=int(pid))
        return True
    if mode == "auto":
        jax.distributed.initialize()  # TPU pod slice / SLURM / other detected clusters
        return jax.process_count() > 1
    if mode not in (None, "", "none"):
        raise ValueError(f"config.distributed must be 'auto' or 'none', got {mode!r}")
    return False


def process_slice(global_batch_size: int, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> slice:
    """The rows of each global batch that this process reads (disjoint, covering)."""
    p = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if global_batch_size % n:
        raise ValueError(f"config.batch_size {global_batch_size} is not divisible by the "
                         f"{n} processes")
    per = global_batch_size // n
    return slice(p * per, (p + 1) * per)


def global_batch(mesh, local_batch: Any, global_batch_size: int) -> Any:
    """The global jax.Array batch from this process's rows (numpy), sharded over (data, fsdp)."""
    shardings = batch_sharding(mesh, local_batch)

    def one(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sh, x, (global_batch_size,) + x.shape[1:])

    return jax.tree_util.tree_map(one, local_batch, shardings)
