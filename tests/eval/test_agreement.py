"""Agreement with the reference harness on the default model: our `mpq-jax` model and
lm-eval's own `hf` model (transformers loading the same GGUF, torch on CPU, float32) score the
same local task documents; per-example log-likelihoods must agree within 1e-3 nats (relative
1e-5 beyond 100 nats: PIQA's long solutions sum over 100+ tokens, where float32 rounding of
two different 30-layer programs alone reaches that) and every accuracy must match exactly."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

FAST_TASKS = ["local_arc_easy", "local_winogrande", "local_commonsense_qa", "local_boolq", "local_hellaswag", "local_lambada_openai"]
SLOW_TASKS = [
    "local_arc_easy",
    "local_arc_challenge",
    "local_piqa",
    "local_hellaswag",
    "local_winogrande",
    "local_boolq",
    "local_openbookqa",
    "local_social_iqa",
    "local_commonsense_qa",
    "local_lambada_openai",
]


@pytest.fixture(scope="module")
def harness_pair(default_model, shared_dir):
    from mpq_jax.eval.downstream import task_manager
    from mpq_jax.eval.harness import MpqJaxLM
    from mpq_jax.eval.torch_reference import lm_eval_hf_model

    return MpqJaxLM(model=default_model, progress=False), lm_eval_hf_model(default_model.source), task_manager()


def _evaluate_both(harness_pair, tasks, limit):
    from lm_eval import simple_evaluate

    ours, hf, manager = harness_pair
    kwargs = dict(tasks=tasks, task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0)
    return simple_evaluate(model=ours, **kwargs), simple_evaluate(model=hf, **kwargs)


def _check_agreement(ours, reference, tasks):
    for task in tasks:
        ours_samples, ref_samples = ours["samples"][task], reference["samples"][task]
        assert [s["doc_id"] for s in ours_samples] == [s["doc_id"] for s in ref_samples]
        for mine, theirs in zip(ours_samples, ref_samples):
            for (got,), (want,) in zip(mine["resps"], theirs["resps"]):
                if isinstance(want, str):  # generation
                    assert got == want, (task, mine["doc_id"])
                    continue
                tolerance = max(1e-3, 1e-5 * abs(want[0]))
                assert abs(got[0] - want[0]) <= tolerance, (task, mine["doc_id"], got, want)
                assert got[1] == want[1], (task, mine["doc_id"])
        for metric in ("acc,none", "acc_norm,none", "exact_match,strict-match", "exact_match,flexible-extract"):
            if metric in reference["results"][task]:
                assert ours["results"][task][metric] == reference["results"][task][metric], (task, metric)


def test_per_example_scores_match_lm_eval_hf_model(harness_pair):
    ours, reference = _evaluate_both(harness_pair, FAST_TASKS, limit=6)
    _check_agreement(ours, reference, FAST_TASKS)


@pytest.mark.slow
def test_per_example_scores_match_lm_eval_hf_model_on_more_documents(harness_pair):
    ours, reference = _evaluate_both(harness_pair, SLOW_TASKS, limit=20)
    _check_agreement(ours, reference, SLOW_TASKS)


@pytest.mark.slow
def test_gsm8k_generation_matches_lm_eval_hf_model(harness_pair):
    ours, reference = _evaluate_both(harness_pair, ["local_gsm8k"], limit=2)
    _check_agreement(ours, reference, ["local_gsm8k"])
