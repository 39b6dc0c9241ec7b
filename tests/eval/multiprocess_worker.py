"""One process of the two-process harness test (tests/eval/test_multiprocess.py).

    python -m tests.eval.multiprocess_worker RANK PORT CHECKPOINT_DIR

Process 0 scores the shared requests through lm-eval's interface and prints them with the
number of batches it ran; process 1 follows and prints how many batches it ran.
"""

from __future__ import annotations

import json
import sys

import jax


def main() -> None:
    rank, port, checkpoint = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=rank)
    from lm_eval.api.instance import Instance

    from mpq_jax.eval import harness
    from tests.eval.test_multiprocess import REQUESTS, harness_options

    lm = harness.MpqJaxLM(path=checkpoint, **harness_options())
    if rank == 0:
        batches = 0
        run_batch = harness._run_batch

        def counted(*args):
            nonlocal batches
            batches += 1
            return run_batch(*args)

        harness._run_batch = counted
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=args, idx=i) for i, args in enumerate(REQUESTS)]
        scores = lm.loglikelihood(requests)
        harness.stop_followers()
        print(json.dumps({"scores": scores, "batches": batches}))
    else:
        print(json.dumps({"followed": harness.follow_batches(lm)}))


if __name__ == "__main__":
    main()
