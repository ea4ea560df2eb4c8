"""One process of a 2-process CPU run (gloo collectives); see tests/test_multihost.py."""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from mtlx.train import distributed, sharding  # noqa: E402


def main(port: str, pid: int, out: str, stack: bool = False):
    import ml_collections
    cfg = ml_collections.ConfigDict(dict(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                         process_id=pid))
    assert distributed.initialize(cfg)
    from tests.test_sharding import STEPS, batch16, reference_setup

    step_fn, state = reference_setup()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2})  # 4 devices over 2 processes
    abstract = jax.eval_shape(lambda s: s, state)
    plan = None
    if stack:  # the state's small leaves stacked at the jit boundary (mtlx.train.stacking)
        from mtlx.train import stacking
        tree_sh = sharding.tree_shardings(mesh, abstract)
        plan = stacking.StackPlan.for_tree(abstract, tree_sh)
    step, state_sh = sharding.jit_train_step(step_fn, mesh, abstract, batch16(0), stack=plan)
    if plan is None:
        state = jax.device_put(state, state_sh)
    else:
        state = stacking.put(state, plan, tree_sh)
    rows = distributed.process_slice(16)
    for i in range(STEPS):
        local = batch16(i).select(np.arange(16)[rows])  # this process reads only its rows
        state, metrics = step(state, distributed.global_batch(mesh, local, 16))
    if plan is not None:
        state = stacking.unpack_fn(plan)(state)
    gathered = jax.experimental.multihost_utils.process_allgather(state.params, tiled=True)
    if pid == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_leaves_with_path(gathered)}
        np.savez(out, **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    import jax.experimental.multihost_utils  # noqa: F401
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], stack=sys.argv[4:] == ["stack"])
