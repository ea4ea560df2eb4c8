"""One process of a 2-process training run through the loop (gloo CPU collectives), for
tests/test_multihost.py: `python tests/mh_loop_worker.py PORT PID CONFIG WORKDIR OUT_JSON`.
Process 0 writes the run's {task: {metric: value}} to OUT_JSON."""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(port: str, pid: int, config: str, workdir: str, out: str):
    import jax
    from mtlx.train.config import load_config
    from mtlx.train.loop import train_and_evaluate
    cfg = load_config(config)
    cfg.coordinator_address = f"127.0.0.1:{port}"
    cfg.num_processes = 2
    cfg.process_id = pid
    results = train_and_evaluate(cfg, workdir, progress=False)
    if pid == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
