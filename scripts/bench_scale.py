"""Scaling of QAT and capture over a device mesh, on the default model.

    python scripts/bench_scale.py [--json PATH] [--shapes 1x1,2x1,1x2,...] [--fsdp-shapes 2x1,...]
                                  [--steps 3] [--seq-len 128] [--batch 8]

Eight CPU devices are made from this machine's cores (XLA_FLAGS
--xla_force_host_platform_device_count=8, set here before JAX starts), so the mesh is real
to JAX — shardings, collectives, per-device buffers — but every device shares the same two
cores: per-device memory is measured exactly (from each array's addressable shards), step
times show the overhead of partitioning and collectives, not a speed-up.

For each mesh shape (data x model; 1x1 is one device without a mesh):
  block    stage 1's jitted step on block 0 of the default model after RTN 2-bit g64 (master
           weights, scales, zeros trainable; AdamW): `--batch` windows of `--seq-len` tokens
           of the calibration text per step
  e2e      stage 2's step on the whole model (scales and 16-bit columns trainable, blocks
           rematerialised), same batch
  capture  data-parallel capture of block 0's input statistics over 8 windows per device
           (shard_map + psum), as tokens per second

Rows (JSON, rewritten after every shape):
  {"stage", "devices", "mesh": {"data", "model"}, "fsdp", "step_seconds" (median of the steps
   after the first, which compiles), "param_bytes_per_device", "opt_bytes_per_device",
   "loss" (after the last step; capture: null), "tokens_per_second" (capture),
   "max_relative_difference" (losses / Hessians against the one-device row)}
The targets are checked at the end: parameter + optimizer bytes per device at most 1.15/N of
one device's on an N-way model axis (N = data x model for the FSDP rows), and results equal to
the one-device run within float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from mpq_jax import parallel  # noqa: E402
from mpq_jax.capture import block_outputs, block_statistics, embed_tokens, rope_for  # noqa: E402
from mpq_jax.config import QatBlockConfig, QatConfig, QatE2eConfig  # noqa: E402
from mpq_jax.data.calibration import calibration_tokens, default_sources  # noqa: E402
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model  # noqa: E402
from mpq_jax.output import atomic_write_text  # noqa: E402
from mpq_jax.qat import stages  # noqa: E402
from mpq_jax.qat.trainable import partition, trainable_mask, trainable_params  # noqa: E402
from mpq_jax.quant.rtn_model import quantize_model_rtn  # noqa: E402

SHAPES = "1x1,2x1,1x2,4x1,2x2,1x4,8x1,4x2,2x4,1x8"
TARGET = 1.15


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        data, model = (int(v) for v in item.lower().split("x"))
        shapes.append((data, model))
    return shapes


def time_steps(step, state, batches: list, steps: int) -> tuple[object, float]:
    """Run `steps` steps; the median wall time of those after the first (which compiles)."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state = step(state, *batches[i % len(batches)])
        jax.block_until_ready(state.losses)
        times.append(time.perf_counter() - start)
    return state, float(np.median(times[1:])) if len(times) > 1 else times[0]


def bench_stage(stage: str, model, packed, tokens: np.ndarray, place: parallel.Placement, steps: int, qat: QatConfig) -> dict:
    spec = model.spec
    cos, sin = rope_for(spec, tokens.shape[1])
    if stage == "block":
        trainable = trainable_params(packed["layers"][0], np.float32, fp_params=model.params["layers"][0])
        moving, frozen = partition(trainable, trainable_mask(trainable, stages.BLOCK_ROLES))
        optimizer = stages.block_optimizer(qat, steps)
        x_fp = np.asarray(embed_tokens(model.params["embed_tokens"]["weight"], tokens))
        target = block_outputs(model.params["layers"][0], spec, x_fp)
        x_q = np.asarray(embed_tokens(packed["embed_tokens"]["weight"], tokens))
    else:
        trainable = trainable_params(packed, np.float32, fixed_codes=True)
        moving, frozen = partition(trainable, trainable_mask(trainable, stages.E2E_ROLES["paper"]))
        optimizer = stages.e2e_optimizer(qat, steps)
    state, frozen, param_bytes, opt_bytes = stages.placed_state(moving, frozen, optimizer, 0, steps, place)
    rope = place.replicated((cos, sin))
    if stage == "block":
        program = stages.step_program("block", spec, optimizer, state, frozen, place)
        batches = [(frozen, place.batch(x_q), place.batch(target), *rope)]
    else:
        program = stages.step_program("e2e", spec, optimizer, state, frozen, place)
        batches = [(frozen, place.batch(tokens), *rope)]
    state, seconds = time_steps(program, state, batches, steps)
    losses = parallel.to_host(state.losses)
    return {"step_seconds": seconds, "param_bytes_per_device": param_bytes, "opt_bytes_per_device": opt_bytes,
            "loss": float(losses[steps - 1]), "losses": [float(v) for v in losses]}


def bench_capture(model, tokens: np.ndarray, mesh) -> dict:
    hidden = np.asarray(embed_tokens(model.params["embed_tokens"]["weight"], tokens))
    layer = model.params["layers"][0]
    times, stats = [], None
    for _ in range(2):  # the first compiles
        start = time.perf_counter()
        stats = block_statistics(layer, model.spec, hidden, mesh=mesh)
        times.append(time.perf_counter() - start)
    block_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(layer))
    return {"step_seconds": times[-1], "tokens_per_second": tokens.size / times[-1], "param_bytes_per_device": block_bytes,
            "opt_bytes_per_device": 0, "loss": None, "stats": stats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="runs/bench_scale.json")
    parser.add_argument("--shapes", default=SHAPES, help="data x model mesh shapes, comma separated")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="windows per training step")
    parser.add_argument("--fsdp-shapes", default="2x1,8x1,2x4", help="shapes run again with FSDP (parameters and optimizer state also over data)")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if (1, 1) not in shapes:
        shapes.insert(0, (1, 1))
    runs = [(shape, False) for shape in shapes] + [(shape, True) for shape in parse_shapes(args.fsdp_shapes) if args.fsdp_shapes]
    model = load_model(DEFAULT_MODEL)
    packed = quantize_model_rtn(model.params, 2, 64)
    capture_windows = 8 * len(jax.devices())
    windows = calibration_tokens(model.tokenizer, default_sources(["wikipedia"]), max(args.batch, capture_windows), args.seq_len, 0)["wikipedia"]
    qat = QatConfig(
        enabled=True, seq_len=args.seq_len,
        block=QatBlockConfig(samples=args.batch, epochs=args.steps, batch_size=args.batch),
        e2e=QatE2eConfig(samples=args.batch, epochs=args.steps, batch_size=args.batch, effective_batch=args.batch, warmup=0.0),
    )
    json_path = Path(args.json)
    rows: list[dict] = []
    reference: dict = {}
    print(f"model {DEFAULT_MODEL}; {len(jax.devices())} CPU devices on {os.cpu_count()} cores; batch {args.batch} x {args.seq_len} tokens, {args.steps} steps")
    for (data, model_axis), fsdp in runs:
        one = (data, model_axis) == (1, 1)
        mesh = None if one else parallel.make_mesh(data, model_axis, devices=jax.devices()[: data * model_axis])
        place = parallel.Placement(mesh, fsdp)
        for stage in ("block", "e2e") if fsdp else ("block", "e2e", "capture"):
            result = bench_capture(model, windows[:capture_windows], mesh) if stage == "capture" else bench_stage(stage, model, packed, windows[: args.batch], place, args.steps, qat)
            if one:
                reference[stage] = result
            ref = reference[stage]
            if stage == "capture":
                diff = max(float(np.max(np.abs(result["stats"][k].hessian - ref["stats"][k].hessian)) / np.max(np.abs(ref["stats"][k].hessian))) for k in ref["stats"])
            else:
                diff = float(np.max(np.abs(np.subtract(result["losses"], ref["losses"])) / np.abs(ref["losses"])))
            row = {"stage": stage, "devices": data * model_axis, "mesh": {"data": data, "model": model_axis}, "fsdp": fsdp,
                   **{k: v for k, v in result.items() if k not in ("stats", "losses")}, "max_relative_difference": diff}
            rows.append(row)
            print(_line(row, reference), flush=True)
            json_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json_path, json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    plot(rows, json_path.with_suffix(".png"))
    failures = check_targets(rows)
    print("\n".join(failures) if failures else f"targets held: memory per device <= {TARGET}/N, results equal within float32 rounding")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


def _memory(row: dict) -> int:
    return row["param_bytes_per_device"] + row["opt_bytes_per_device"]


def _ways(row: dict) -> int:
    return row["mesh"]["model"] * (row["mesh"]["data"] if row["fsdp"] else 1)


def _line(row: dict, reference: dict) -> str:
    one = reference[row["stage"]]
    head = f"{row['stage']:8s} {row['devices']} dev data {row['mesh']['data']} model {row['mesh']['model']}{' fsdp' if row['fsdp'] else '     '}: "
    if row["stage"] == "capture":  # the block is replicated by design; the windows are split
        return head + f"{row['step_seconds']:7.3f} s  {row['tokens_per_second']:8.0f} tok/s  Hessian rel diff {row['max_relative_difference']:.1e}"
    ratio = _memory(row) / (one["param_bytes_per_device"] + one["opt_bytes_per_device"])
    return (head + f"{row['step_seconds']:7.3f} s/step  params {row['param_bytes_per_device'] / 2**20:8.2f} MiB  "
            f"opt {row['opt_bytes_per_device'] / 2**20:7.2f} MiB  memory x{ratio:.3f} (1/N = {1 / _ways(row):.3f})  "
            f"loss {row['loss']:.6g}  rel diff {row['max_relative_difference']:.1e}")


def plot(rows: list[dict], path: Path) -> None:
    """Per-device parameter + optimizer memory against the ways the state is split, both
    stages, with the 1/N line: the scaling at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mpq_jax.report import save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage, markers in (("block", ("o", "x")), ("e2e", ("s", "+"))):
        stage_rows = [r for r in rows if r["stage"] == stage]
        base = next(r for r in stage_rows if r["devices"] == 1)
        for fsdp in (False, True):
            points = [(_ways(r), _memory(r) / _memory(base)) for r in stage_rows if r["fsdp"] == fsdp]
            if points:
                ways, ratio = zip(*points)
                ax.scatter(ways, ratio, marker=markers[fsdp], s=60, label=f"{stage}{' FSDP' if fsdp else ''}")
    ways = np.array([1, 2, 4, 8])
    ax.plot(ways, 1 / ways, "k--", lw=1, label="1/N")
    ax.plot(ways, TARGET / ways, "k:", lw=1, label=f"target {TARGET}/N")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("N: ways the state is split (model axis; x data with FSDP)")
    ax.set_ylabel("params + optimizer bytes per device / one device")
    ax.set_title("QAT state per device on the default model (8 CPU devices)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def check_targets(rows: list[dict]) -> list[str]:
    failures = []
    for stage in ("block", "e2e"):
        base = next(r for r in rows if r["stage"] == stage and r["devices"] == 1)
        for row in rows:
            if row["stage"] != stage:
                continue
            if _memory(row) > TARGET * _memory(base) / _ways(row):
                failures.append(f"NOT MET: {stage} on {row['mesh']}: {_memory(row)} bytes per device > {TARGET}/{_ways(row)} of {_memory(base)}")
            if row["max_relative_difference"] > 1e-4:
                failures.append(f"NOT MET: {stage} on {row['mesh']}: losses differ by {row['max_relative_difference']:.2e} relative")
    for row in rows:
        if row["stage"] == "capture" and row["max_relative_difference"] > 1e-5:
            failures.append(f"NOT MET: capture on {row['mesh']}: Hessians differ by {row['max_relative_difference']:.2e} of their largest entry")
    return failures


if __name__ == "__main__":
    sys.exit(main())
