"""One of two processes (jax.distributed, gloo on CPU, two CPU devices each) running capture
and both QAT stages on a (data 2, model 2) mesh, for tests/parallel/test_multihost.py.

    python -m tests.parallel.multihost_worker RANK PORT MODEL_DIR CHECKPOINTS RESULT.npz

Each process holds only its share of the windows (`parallel.process_share`); the mesh puts
the data axis across the processes and the model axis inside each. Every checkpoint is
followed by a short sleep so that the test can kill the processes between steps.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mpq_jax import parallel
from mpq_jax.capture import block_statistics, embed_tokens
from mpq_jax.config import ParallelConfig
from mpq_jax.qat import loop
from tests.parallel.common import QAT, tiny_problem


def main(rank: int, port: str, model_dir: str, checkpoints: str, result: str) -> None:
    parallel.initialize(ParallelConfig(coordinator_address=f"localhost:{port}", num_processes=2, process_id=rank))
    save = loop.TrainCheckpoints.save

    def slow_save(self, state, final=False):
        save(self, state, final)
        time.sleep(0.3)

    loop.TrainCheckpoints.save = slow_save
    logging.basicConfig(level=logging.INFO, format=f"[{rank}] %(name)s: %(message)s")
    from mpq_jax.qat.stages import block_stage, e2e_stage

    mesh = parallel.make_mesh(data=2, model=2)
    placement = parallel.Placement(mesh)
    model, packed, tokens = tiny_problem(model_dir)
    mine = tokens[parallel.share_rows(len(tokens), placement.share, "windows")]
    # Capture: each device runs its windows through block 0; the statistics are reduced.
    hidden = np.asarray(embed_tokens(model.params["embed_tokens"]["weight"], mine))
    stats = block_statistics(model.params["layers"][0], model.spec, hidden, mesh=mesh)
    root = Path(checkpoints)
    after_block, block_note = block_stage(model.params, packed, model.spec, mine, QAT, root, "multihost", progress=False, placement=placement)
    after_e2e, e2e_note = e2e_stage(after_block, model.spec, mine, QAT, root, "multihost", progress=False, placement=placement)
    arrays = {f"hessian/{name}": s.hessian for name, s in stats.items()}
    arrays.update({f"block/{name}": np.asarray(curve) for name, curve in block_note.losses.items()})
    arrays["e2e"] = np.asarray(e2e_note.losses["e2e"])
    arrays.update({f"leaf/{i:04d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(after_e2e))})
    arrays["share"] = np.asarray(placement.share)
    np.savez(f"{result}.rank{rank}.npz", **arrays)
    parallel.sync("results written")


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:6])
