"""Agreement with the reference harness on the default model: our `mpq-jax` model and
lm-eval's own `hf` model (transformers loading the same GGUF, torch on CPU, float32) score the
same local task documents; per-example log-likelihoods must agree within PER_TOKEN = 1e-4 nats
per continuation token, and at least 1e-3, and every accuracy must match exactly. The two
float32 30-layer programs give logits that agree to ~1e-6 of max|logit| ≈ 30, so a token's
log-probability (its logit minus a log-sum-exp) moves by ≲ 6e-5, and a sum over n tokens
by at most n times that (measured: 4.2e-5 for one token, 5.6e-4 over a 51-token PIQA
solution). The exact accuracies and greedy flags rest on margins, measured on these
documents: a document's two best choices (by log-likelihood and per character) lie at least
70 times their two differences apart (ARC-Easy), a greedy flag is at least 0.09 nats from
flipping, and GSM8K's greedy continuations never come within 0.04 nats of a tie."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

PER_TOKEN = 1e-4  # nats per continuation token (see the module docstring)
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


def _check_agreement(ours, reference, tasks, lm):
    for task in tasks:
        ours_samples, ref_samples = ours["samples"][task], reference["samples"][task]
        assert [s["doc_id"] for s in ours_samples] == [s["doc_id"] for s in ref_samples]
        for mine, theirs in zip(ours_samples, ref_samples):
            for arguments, (got,), (want,) in zip(mine["arguments"], mine["resps"], theirs["resps"]):
                if isinstance(want, str):  # generation
                    assert got == want, (task, mine["doc_id"])
                    continue
                tolerance = max(1e-3, PER_TOKEN * len(lm._encode_pair(*arguments)[1]))
                assert abs(got[0] - want[0]) <= tolerance, (task, mine["doc_id"], got, want)
                assert got[1] == want[1], (task, mine["doc_id"])
        for metric in ("acc,none", "acc_norm,none", "exact_match,strict-match", "exact_match,flexible-extract"):
            if metric in reference["results"][task]:
                assert ours["results"][task][metric] == reference["results"][task][metric], (task, metric)


def test_per_example_scores_match_lm_eval_hf_model(harness_pair):
    ours, reference = _evaluate_both(harness_pair, FAST_TASKS, limit=6)
    _check_agreement(ours, reference, FAST_TASKS, harness_pair[0])


@pytest.mark.slow
def test_per_example_scores_match_lm_eval_hf_model_on_more_documents(harness_pair):
    ours, reference = _evaluate_both(harness_pair, SLOW_TASKS, limit=10)
    _check_agreement(ours, reference, SLOW_TASKS, harness_pair[0])


@pytest.mark.slow
def test_gsm8k_generation_matches_lm_eval_hf_model(harness_pair):
    ours, reference = _evaluate_both(harness_pair, ["local_gsm8k"], limit=2)
    _check_agreement(ours, reference, ["local_gsm8k"], harness_pair[0])
