"""MpqJaxLM against references: a plain forward with float64 log-softmax on random inputs, and
lm-eval's own `hf` model on a tiny random Llama with the real tokenizer (every request type)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import jax.numpy as jnp  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from mpq_jax.errors import ConfigError  # noqa: E402
from mpq_jax.eval.harness import MpqJaxLM, bucket_lengths, padded_length, plan_rows, score_sequences  # noqa: E402
from mpq_jax.models.decoder import forward  # noqa: E402


def test_buckets_cover_every_length_with_at_most_a_quarter_of_padding():
    buckets = bucket_lengths(2048)
    assert buckets[-1] == 2048 and len(buckets) <= 24 and list(buckets) == sorted(set(buckets))
    for length in range(1, 2049):
        padded = padded_length(length, buckets)
        assert padded >= length and (length < 16 or padded <= 1.25 * length + 16)
    assert bucket_lengths(100)[-1] == 100
    with pytest.raises(ValueError, match="longest bucket"):
        padded_length(101, bucket_lengths(100))


def test_one_token_continuations_of_the_same_input_share_a_row():
    sequences = [[5, 6, 7, 1], [5, 6, 7, 2], [5, 6, 7, 8, 9], [4, 1]]
    rows, owners = plan_rows(sequences, [1, 1, 2, 1])
    assert len(rows) == 3
    assert rows[0].inputs == [5, 6, 7] and rows[0].positions == [2, 2] and rows[0].targets == [1, 2]
    assert rows[1].inputs == [5, 6, 7, 8] and rows[1].positions == [2, 3] and rows[1].targets == [8, 9]
    assert owners == [(0, 0, 1), (0, 1, 1), (1, 0, 2), (2, 0, 1)]
    with pytest.raises(ValueError, match="no context"):
        plan_rows([[1, 2]], [2])


@pytest.fixture(scope="module")
def tiny_directory(tmp_path_factory):
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    directory = tmp_path_factory.mktemp("tiny-llama-lm-eval")
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", directory)
    return directory


@pytest.fixture(scope="module")
def ours(tiny_directory):
    # Small batches and a small token budget so that one call runs several shapes.
    return MpqJaxLM(path=str(tiny_directory), batch_size=3, batch_tokens=96, max_length=64, progress=False)


@pytest.fixture(scope="module")
def hf(tiny_directory):
    pytest.importorskip("torch")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_directory), dtype="float32", batch_size=4, device="cpu", max_length=64)


def test_scores_equal_a_plain_forward_with_float64_log_softmax(ours):
    rng = np.random.default_rng(0)
    vocab = ours.spec.vocab_size
    sequences, lengths = [], []
    shared = list(rng.integers(0, vocab, 20))
    for _ in range(4):  # one-token continuations of one input: one shared row
        sequences.append(shared + [int(rng.integers(0, vocab))])
        lengths.append(1)
    for size in (3, 17, 40, 65):
        sequences.append(list(rng.integers(0, vocab, size)))
        lengths.append(int(rng.integers(1, size)))
    got = score_sequences(ours, sequences, lengths, disable_tqdm=True)
    for tokens, count, (log_prob, greedy) in zip(sequences, lengths, got):
        logits = np.asarray(forward(ours.params, ours.spec, jnp.asarray([tokens[:-1]], jnp.int32))[0], np.float64)
        log_softmax = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
        positions = np.arange(len(tokens) - 1 - count, len(tokens) - 1)
        targets = np.asarray(tokens)[positions + 1]
        assert log_prob == pytest.approx(np.sum(log_softmax[positions, targets]), abs=1e-4, rel=1e-5)
        assert greedy == bool(np.all(np.argmax(logits[positions], -1) == targets))


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


CONTEXTS = [
    "Question: Which gas do plants take in from the air?\nAnswer:",
    "The tower is 324 metres tall, about the same height as an 81-storey building, and",
    "Robert Boulter is an English film and television actor. He had a guest starring role on the television series "
    "The Bill in 2000. This was followed by a starring role in the play Herons written by Simon Stephens, which was "
    "performed in 2001 at the Royal Court Theatre.",  # longer than max_length=64: left-truncated
]


def test_loglikelihood_matches_lm_eval_hf_model(ours, hf):
    arguments = [(context, continuation) for context in CONTEXTS for continuation in (" A", " B", " carbon dioxide and water")]
    arguments += [("", "An empty context is scored after the prefix token."), ("Trailing space ", "moves over.")]
    requests = _requests("loglikelihood", arguments)
    got, want = ours.loglikelihood(requests), hf.loglikelihood(requests)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_loglikelihood_rolling_matches_lm_eval_hf_model(ours, hf):
    texts = [CONTEXTS[0], CONTEXTS[2] * 3]  # the second spans several 64-token windows
    requests = _requests("loglikelihood_rolling", [(text,) for text in texts])
    np.testing.assert_allclose(ours.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests), rtol=1e-5, atol=1e-4)


def test_generate_until_matches_lm_eval_hf_model(ours, hf):
    kwargs = {"until": ["\n\n", "."], "max_gen_toks": 12, "do_sample": False}
    requests = _requests("generate_until", [(context, dict(kwargs)) for context in CONTEXTS])
    got, want = ours.generate_until(requests), hf.generate_until(requests)
    assert got == want
    assert all("." not in text for text in got) and any(got)  # something was generated and cut


def test_model_args_errors_name_the_argument(tiny_directory):
    with pytest.raises(ConfigError, match="exactly one of path"):
        MpqJaxLM()
    with pytest.raises(ConfigError, match="unknown argument 'pretrained'"):
        MpqJaxLM(path=str(tiny_directory), pretrained="x")
    with pytest.raises(ConfigError, match="batch_size must be an integer"):
        MpqJaxLM(path=str(tiny_directory), batch_size="many")
