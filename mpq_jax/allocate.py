"""Choosing one candidate per layer under a global bit budget (AMLQ eqs. 3-4 and 15-16).

Each layer has candidates (stored bits, loss δ, label); pick one per layer to minimise the
summed loss with total bits <= budget: a multiple-choice knapsack. It runs on the host, in
plain Python/numpy, after the measuring pass.

`greedy_allocate` is the method's strategy: every layer starts at its cheapest candidate,
then upgrades are taken in order of loss saved per extra bit along each layer's lower
convex hull of (bits, loss) — the steps an exact solver of the relaxed problem would take —
while they fit; a final pass spends what is left on the best single swaps that still fit.
`exact_allocate` is a dynamic program over (layer, bits used), exact but O(layers x budget x
candidates): the reference the greedy is tested against on small instances.

Not here: measuring candidates (quant/), packing the chosen layers.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Sequence

import numpy as np

from mpq_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Candidate:
    bits: int  # every stored bit of the layer with this choice (QuantizedLinear.storage_bits)
    loss: float  # the layer's sensitivity δ with this choice
    label: Any = None  # what to build: e.g. (alpha, preset, rank)


def bpw_range(candidates: Sequence[Sequence[Candidate]], n_weights: int) -> tuple[float, float]:
    """Smallest and largest bits per weight any choice can reach."""
    low = sum(min(c.bits for c in layer) for layer in candidates)
    high = sum(max(c.bits for c in layer) for layer in candidates)
    return low / n_weights, high / n_weights


def check_budget(candidates: Sequence[Sequence[Candidate]], budget_bits: float, n_weights: int) -> None:
    """ConfigError naming the reachable BPW range if no choice fits the budget."""
    if any(not layer for layer in candidates):
        raise ConfigError("allocation: every layer needs at least one candidate")
    low, high = bpw_range(candidates, n_weights)
    if budget_bits < low * n_weights:
        raise ConfigError(
            f"target BPW {budget_bits / n_weights:.3f} is below what the candidates can reach: "
            f"choose a target in [{low:.3f}, {high:.3f}] or add cheaper candidates"
        )


def _hull(layer: Sequence[Candidate]) -> list[int]:
    """Indices of the lower convex hull of (bits, loss), cheapest first, loss strictly falling."""
    order = sorted(range(len(layer)), key=lambda i: (layer[i].bits, layer[i].loss))
    pareto: list[int] = []
    for i in order:
        if not pareto or layer[i].loss < layer[pareto[-1]].loss:
            if pareto and layer[i].bits == layer[pareto[-1]].bits:
                pareto.pop()
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = layer[hull[-2]], layer[hull[-1]]
            c = layer[i]
            # b is above the segment a-c (saves less per bit than going straight to c): drop it.
            if (b.loss - a.loss) * (c.bits - a.bits) >= (c.loss - a.loss) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def greedy_allocate(candidates: Sequence[Sequence[Candidate]], budget_bits: float, n_weights: int = 1) -> list[int]:
    """Index of the chosen candidate per layer (see the module docstring)."""
    check_budget(candidates, budget_bits, n_weights)
    hulls = [_hull(layer) for layer in candidates]
    position = [0] * len(candidates)
    choice = [hull[0] for hull in hulls]
    used = sum(candidates[i][choice[i]].bits for i in range(len(candidates)))

    def push(heap, i):
        if position[i] + 1 < len(hulls[i]):
            cur, nxt = candidates[i][hulls[i][position[i]]], candidates[i][hulls[i][position[i] + 1]]
            heapq.heappush(heap, (-(cur.loss - nxt.loss) / (nxt.bits - cur.bits), i))

    heap: list = []
    for i in range(len(candidates)):
        push(heap, i)
    while heap:
        _, i = heapq.heappop(heap)
        cur, nxt = candidates[i][hulls[i][position[i]]], candidates[i][hulls[i][position[i] + 1]]
        if used + nxt.bits - cur.bits <= budget_bits:
            used += nxt.bits - cur.bits
            position[i] += 1
            choice[i] = hulls[i][position[i]]
            push(heap, i)
    # Spend the remainder: the best single swap (any candidate) that still fits, repeatedly.
    while True:
        best = None
        for i, layer in enumerate(candidates):
            cur = layer[choice[i]]
            for j, cand in enumerate(layer):
                gain = cur.loss - cand.loss
                if gain > 0 and used + cand.bits - cur.bits <= budget_bits and (best is None or gain > best[0]):
                    best = (gain, i, j)
        if best is None:
            return choice
        _, i, j = best
        used += candidates[i][j].bits - candidates[i][choice[i]].bits
        choice[i] = j


def exact_allocate(candidates: Sequence[Sequence[Candidate]], budget_bits: int) -> list[int]:
    """Optimal choice by dynamic programming over integer bits (small instances only)."""
    budget = int(budget_bits)
    inf = float("inf")
    best = np.full(budget + 1, inf)  # best[b] = least loss of the layers so far using exactly b bits
    best[0] = 0.0
    back = []
    for layer in candidates:
        new = np.full(budget + 1, inf)
        arg = np.full(budget + 1, -1, dtype=np.int64)
        for j, cand in enumerate(layer):
            if cand.bits > budget:
                continue
            shifted = np.full(budget + 1, inf)
            shifted[cand.bits :] = best[: budget + 1 - cand.bits] + cand.loss
            better = shifted < new
            new[better], arg[better] = shifted[better], j
        back.append(arg)
        best = new
    if not np.isfinite(best).any():
        raise ConfigError("allocation: no choice fits the budget")
    b = int(np.argmin(best))
    choice = []
    for layer, arg in zip(reversed(candidates), reversed(back)):
        j = int(arg[b])
        choice.append(j)
        b -= layer[j].bits
    return choice[::-1]


def total(candidates: Sequence[Sequence[Candidate]], choice: Sequence[int]) -> tuple[int, float]:
    """(bits, loss) of a choice."""
    picked = [layer[j] for layer, j in zip(candidates, choice)]
    return sum(c.bits for c in picked), float(sum(c.loss for c in picked))
