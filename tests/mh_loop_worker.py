"""One process of a 2-process training run through the loop (gloo CPU collectives), for
tests/test_multihost.py and tests/test_remote_paths.py:
`python tests/mh_loop_worker.py PORT PID CONFIG WORKDIR OUT_JSON [TERM_AT]`.
Process 0 writes the run's {task: {metric: value}} to OUT_JSON. With TERM_AT, process 1 sends
itself SIGTERM (a preemption notice) after step TERM_AT, and each process writes
{"step": the step it stopped at, "mode": the loop's PreemptionWatch mode} to OUT_JSON.PID."""
import json
import os
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(port: str, pid: int, config: str, workdir: str, out: str, term_at: int = None):
    import jax
    from mtlx.train import checkpoint
    from mtlx.train.config import load_config
    from mtlx.train.loop import train_and_evaluate
    cfg = load_config(config)
    cfg.coordinator_address = f"127.0.0.1:{port}"
    cfg.num_processes = 2
    cfg.process_id = pid
    watches = []
    if term_at is not None:  # record the mode the loop's PreemptionWatch picked
        init = checkpoint.PreemptionWatch.__init__

        def recording_init(self, multi_process):
            init(self, multi_process)
            watches.append(self.mode)
        checkpoint.PreemptionWatch.__init__ = recording_init

    def on_step(step):
        if term_at is None:
            return
        if pid == 1 and step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # steps long enough for the notice to reach the coordinator mid-run
    results, state = train_and_evaluate(cfg, workdir, progress=False, on_step=on_step,
                                        return_state=True)
    if term_at is not None:
        with open(f"{out}.{pid}", "w") as f:
            json.dump({"step": int(jax.device_get(state.step)), "mode": watches}, f)
    elif pid == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
         int(sys.argv[6]) if len(sys.argv) > 6 else None)
