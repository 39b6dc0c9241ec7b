"""Greedy allocation against the exact dynamic program on small random instances."""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.allocate import Candidate, bpw_range, exact_allocate, greedy_allocate, total
from mpq_jax.errors import ConfigError


def random_instance(rng, layers=8, options=6):
    """Per layer: more bits -> less loss, with diminishing returns and some noise (like δ vs bits)."""
    out = []
    for _ in range(layers):
        bits = np.sort(rng.choice(np.arange(10, 80), options, replace=False))
        scale = rng.uniform(0.5, 5)
        loss = scale * np.exp(-bits / rng.uniform(8, 25)) * rng.uniform(0.8, 1.2, options)
        out.append([Candidate(int(b), float(l), (i, int(b))) for i, (b, l) in enumerate(zip(bits, loss))])
    return out


def test_greedy_is_feasible_and_close_to_exact():
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(60):
        cands = random_instance(rng)
        low = sum(min(c.bits for c in layer) for layer in cands)
        high = sum(max(c.bits for c in layer) for layer in cands)
        budget = int(rng.uniform(low, high))
        g_bits, g_loss = total(cands, greedy_allocate(cands, budget))
        e_bits, e_loss = total(cands, exact_allocate(cands, budget))
        assert g_bits <= budget and e_bits <= budget
        assert e_loss <= g_loss + 1e-12  # the DP is exact
        gaps.append((g_loss - e_loss) / e_loss)
    gaps = np.array(gaps)
    print(f"greedy vs exact over 60 instances: mean gap {gaps.mean():.2%}, worst {gaps.max():.2%}, exact in {np.mean(gaps < 1e-12):.0%}")
    assert gaps.mean() < 0.02 and gaps.max() < 0.15


def test_exact_matches_brute_force_on_tiny_instances():
    import itertools

    rng = np.random.default_rng(1)
    for _ in range(20):
        cands = random_instance(rng, layers=4, options=3)
        budget = int(rng.uniform(sum(min(c.bits for c in l) for l in cands), sum(max(c.bits for c in l) for l in cands)))
        feasible = [ch for ch in itertools.product(range(3), repeat=4) if total(cands, ch)[0] <= budget]
        best = min(total(cands, ch)[1] for ch in feasible)
        assert total(cands, exact_allocate(cands, budget))[1] == pytest.approx(best)


def test_infeasible_budget_names_the_reachable_range():
    cands = [[Candidate(20, 1.0), Candidate(40, 0.5)], [Candidate(30, 1.0), Candidate(60, 0.1)]]
    assert bpw_range(cands, 10) == (5.0, 10.0)
    with pytest.raises(ConfigError, match=r"\[5\.000, 10\.000\]"):
        greedy_allocate(cands, 40, n_weights=10)
    # A budget above every candidate takes the lowest loss everywhere.
    assert greedy_allocate(cands, 1000, n_weights=10) == [1, 1]
