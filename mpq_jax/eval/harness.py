"""lm-evaluation-harness model over mpq-jax's JAX decoder: `MpqJaxLM`, registered as `mpq-jax`.

    lm_eval.simple_evaluate(model=MpqJaxLM(path="runs/x/model"), tasks=[...], task_manager=...)
    mpq-lm-eval --model mpq-jax --model_args path=runs/x/model --include_path ... --tasks ...

`path` is anything `load_model` reads (a packed mpq-jax folder, a HF directory, a .gguf,
the default model's name); an already loaded model (FP, fake-quantized or packed params)
is handed over as `MpqJaxLM(model=LoadedModel)`.

It follows lm-eval's own `hf` model request by request, so that per-example scores can be
compared with it: the same tokenization (`TemplateLM`'s context/continuation split, the
tokenizer's own BOS behaviour, BOS-or-EOS as the prefix of an empty context), the same
left truncation to `max_length`, log-probabilities in float32, rolling windows from
lm-eval's helpers, greedy generation cut at the stop strings.

Fixed shapes: a batch of requests is right-padded to one of a few bucket lengths
(`bucket_lengths`) and to a fixed number of rows for that length (at most `batch_size`, and
at most `batch_tokens` tokens in all), so jit compiles each block once per bucket rather
than once per request. Right padding cannot change a causal model's scores at the real
positions; padded rows and positions are dropped. Generation runs `batch_size` prompts side
by side with the KV cache of `mpq_jax.infer` (`generate_steps`), prompts and cache padded to
buckets, so it too compiles once per bucket (and once more for a short last batch).

Quantized block linears are dequantized once when no Pallas kernel serves the backend (CPU),
as perplexity does; on GPU/TPU every forward runs the kernels.

Multi-process runs (`jax.distributed`): lm-eval runs on process 0 only and sees one model
(rank 0, world size 1); every other process calls `follow_batches(lm)`, which receives each
scoring batch from process 0 (`mpq_jax.parallel.broadcast_from_leader`) and runs the same
jitted forward, so a model sharded across processes computes in step. Generation is
process-0 only for now.

Not for: choosing tasks or summarizing results (`mpq_jax.eval.downstream`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mpq_jax.errors import ConfigError
from mpq_jax.infer import SamplingConfig, generate_steps
from mpq_jax.models.checkpoint import LoadedModel, load_model
from mpq_jax.models.decoder import final_hidden, lm_head_weight, target_log_probs
from mpq_jax.packed.params import dequantized_params
from mpq_jax.parallel import broadcast_from_leader, is_leader
from pallas_kernels.dispatch import kernel_backend

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError as exc:  # pragma: no cover - lm-eval is a dependency; this names the fix
    raise ConfigError("mpq_jax.eval.harness needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13,<0.5'") from exc

log = logging.getLogger(__name__)

MODEL_NAME = "mpq-jax"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that set none


def bucket_lengths(max_length: int) -> tuple[int, ...]:
    """Padded lengths a batch may take: four steps per doubling (16, 32, 48, 64, 80, ..., 128,
    160, ...), at least 16 apart, then max_length.

    A batch then carries at most a quarter of padding (about a tenth on average) while a
    2048-token model compiles at most 24 shapes; coarser steps (x1.5) cost 1.6x in wall time
    on multiple-choice tasks, where most requests are 30-200 tokens long.
    """
    lengths, length = [], 16
    while length < max_length:
        lengths.append(length)
        length += max(16, 1 << (length.bit_length() - 3))
    return tuple(lengths) + (max_length,)


def padded_length(length: int, buckets: tuple[int, ...]) -> int:
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"{length} tokens do not fit the longest bucket ({buckets[-1]})")


@jax.jit
def _scores(hidden: jax.Array, head: jax.Array, slots: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The LM head only where something is scored: hidden [B, T, D] at flat indices b * T + t [S]."""
    picked = hidden.reshape(-1, hidden.shape[-1])[slots]
    log_probs, greedy = target_log_probs(picked[None], head, targets[None])
    return log_probs[0], greedy[0]


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mpq-jax model_args: {name} must be an integer, got {value!r}") from None


@register_model(MODEL_NAME)
class MpqJaxLM(TemplateLM):
    """An lm-eval `LM` over an mpq-jax model (see the module docstring)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        model: LoadedModel | None = None,
        dtype: str = "float32",
        batch_size: int | str = 16,
        batch_tokens: int | str = 8192,
        max_length: int | str | None = None,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        progress: bool = True,
        **ignored: Any,
    ):
        super().__init__()
        if (path is None) == (model is None):
            raise ConfigError("mpq-jax model: give exactly one of path=... (model_args) or model=LoadedModel")
        # lm-eval's CLI also passes device/max_batch_size; the JAX backend decides the device.
        unknown = sorted(set(ignored) - {"device", "max_batch_size"})
        if unknown:
            raise ConfigError(
                f"mpq-jax model_args: unknown argument {unknown[0]!r}; allowed: path, dtype, batch_size, "
                "batch_tokens, max_length, max_gen_toks, add_bos_token"
            )
        self.model = model if model is not None else load_model(path, dtype=dtype)
        if self.model.tokenizer is None:
            raise ConfigError(f"mpq-jax model: {self.model.source} has no tokenizer; lm-eval needs one")
        self.tokenizer = self.model.tokenizer
        self.spec = self.model.spec
        # On a backend without a Pallas kernel, unpacking codes in every forward would dominate.
        self.params = dequantized_params(self.model.params) if kernel_backend() is None else self.model.params
        # "auto" (lm-eval's adaptive batch size) has no meaning here: the token budget bounds memory.
        self.batch_size = 16 if str(batch_size).startswith("auto") else _as_int(batch_size, "batch_size")
        self.batch_tokens = _as_int(batch_tokens, "batch_tokens")
        self._max_length = _as_int(max_length, "max_length") if max_length else self._model_max_length()
        self._max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        if self.batch_size < 1 or self.batch_tokens < 1 or self._max_length < 2:
            raise ConfigError("mpq-jax model_args: batch_size, batch_tokens must be >= 1 and max_length >= 2")
        self.add_bos_token = add_bos_token
        self.progress = progress
        self.buckets = bucket_lengths(self._max_length)
        self.head = lm_head_weight(self.params, self.spec)

    def _model_max_length(self) -> int:
        limit = self.model.hf_config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH
        return int(min(limit, DEFAULT_MAX_LENGTH))

    # -- what lm-eval asks of a model --------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # The token standing in for an empty context: BOS where there is one, else EOS (as `hf`).
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or self.model.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As `hf`: an explicit flag wins, then add_bos_token, then the tokenizer's own default;
        # a text that already starts with the BOS text gets no second one.
        flag = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        options = {} if flag is None else {"add_special_tokens": flag}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(request key, context ids, continuation ids)] -> [(sum log p(continuation), is greedy)]."""
        sequences, continuation_lengths = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            # As `hf`: the last max_length + 1 tokens; the model reads all but the last.
            sequences.append((list(context) + list(continuation))[-(self._max_length + 1) :])
            continuation_lengths.append(len(continuation))
        results = score_sequences(self, sequences, continuation_lengths, disable_tqdm or not self.progress)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, scored in disjoint windows of up to max_length tokens."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            token_windows = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for context, continuation in map(lm_eval_utils.make_disjoint_window, token_windows):
                windows.append((None, context, continuation))
                owner.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owner, scores):
            totals[index] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations, cut at the first stop string.

        Requests with the same generation settings run `batch_size` at a time, longest prompt
        first, each row stopping on its own (EOS or a stop string) and the batch when all have.
        """
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[tuple[int, list[int], list[str]]]] = {}
        settings: dict[str, dict] = {}
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs["max_gen_toks"])
            if max_new >= self._max_length:
                raise ConfigError(f"generation asks for {max_new} new tokens, not fewer than max_length {self._max_length}")
            key = json.dumps(kwargs, sort_keys=True, default=str)
            settings[key] = kwargs
            # As `hf`: the context keeps its last max_length - max_gen_toks tokens.
            groups.setdefault(key, []).append((index, self.tok_encode(context)[-(self._max_length - max_new) :], until))
        outputs: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self.progress)
        for key, jobs in groups.items():
            jobs.sort(key=lambda job: -len(job[1]))
            for first in range(0, len(jobs), self.batch_size):
                batch = jobs[first : first + self.batch_size]
                texts = self.generate_texts([job[1] for job in batch], [job[2] for job in batch], settings[key])
                for (index, _, _), text in zip(batch, texts):
                    outputs[index] = text
                bar.update(len(batch))
        bar.close()
        for req, text in zip(requests, outputs):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    def generate_texts(self, prompts: list[list[int]], untils: list[list[str]], kwargs: dict) -> list[str]:
        """Decoded continuations of `prompts` side by side, each cut at its first stop string."""
        sampling = SamplingConfig()
        if kwargs.get("do_sample"):
            sampling = SamplingConfig(
                temperature=float(kwargs.get("temperature", 1.0)),
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
        longest = max(len(prompt) for prompt in prompts)
        new_tokens: list[list[int]] = [[] for _ in prompts]
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        steps = generate_steps(
            self.params,
            self.spec,
            prompts,
            int(kwargs["max_gen_toks"]),
            sampling=sampling,
            seed=int(kwargs.get("seed") or 0),
            prompt_len=padded_length(longest, self.buckets),
            # Every decode step reads the whole cache: as long as this batch needs, in buckets.
            cache_len=padded_length(longest + int(kwargs["max_gen_toks"]), self.buckets),
        )
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                new_tokens[row].append(token)
                texts[row] = self.tok_decode(new_tokens[row])
                done[row] = token == self.eot_token_id or any(stop and stop in texts[row] for stop in untils[row])
            if all(done):
                break
        for row, until in enumerate(untils):
            for stop in until:
                if stop:
                    texts[row] = texts[row].split(stop)[0]
        return texts


def slot_buckets(tokens: int) -> tuple[int, ...]:
    """Scored positions a batch of `tokens` input tokens may take: powers of two from 16,
    then `tokens`. The LM head runs only at these slots (the continuations' positions of
    every row, flattened), so it costs what the continuations need plus at most as much
    padding, with a few compiled sizes per batch shape."""
    sizes, size = [], 16
    while size < tokens:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (tokens,)


def batch_rows(lm: MpqJaxLM, length: int) -> int:
    """Rows of a batch padded to `length`: batch_size, fewer when it would pass batch_tokens."""
    return max(1, min(lm.batch_size, lm.batch_tokens // length))


def score_batch(
    lm: MpqJaxLM, inputs: np.ndarray, slots: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """inputs [rows, length]; slots (flat indices row * length + position), targets [S] ->
    (log p(target | the row's tokens up to that position), target is the argmax), both [S].

    The one place the harness runs the model; in a multi-process run process 0 first sends
    the batch to the followers so that they run the same program.
    """
    if jax.process_count() > 1 and is_leader():
        _send_to_followers(inputs, slots, targets)
    return _run_batch(lm, inputs, slots, targets)


def _run_batch(lm: MpqJaxLM, inputs: np.ndarray, slots: np.ndarray, targets: np.ndarray):
    hidden = final_hidden(lm.params, lm.spec, jnp.asarray(inputs))
    log_probs, greedy = _scores(hidden, lm.head, jnp.asarray(slots), jnp.asarray(targets))
    return np.asarray(log_probs), np.asarray(greedy)


@dataclasses.dataclass
class _Row:
    """One padded model input and the (position, next token) pairs scored on it."""

    inputs: list[int]
    positions: list[int] = dataclasses.field(default_factory=list)
    targets: list[int] = dataclasses.field(default_factory=list)


def plan_rows(sequences: list[list[int]], continuation_lengths: list[int]) -> tuple[list[_Row], list[tuple[int, int, int]]]:
    """Rows to run and, per request, (row, first slot, slot count).

    A request reads its sequence minus the last token and scores the continuation's tokens.
    Requests with a one-token continuation and the same input share a row (as `hf`'s logits
    cache does): multiple-choice tasks whose answers are single tokens (a letter, yes/no) then
    cost one forward per question instead of one per choice.
    """
    rows: list[_Row] = []
    shared: dict[tuple[int, ...], int] = {}
    owners = []
    for tokens, count in zip(sequences, continuation_lengths):
        inputs = tokens[:-1]
        if count > len(inputs):
            raise ValueError(f"a {count}-token continuation leaves no context within max_length")
        key = tuple(inputs) if count == 1 else None
        if key is not None and key in shared:
            index = shared[key]
        else:
            index = len(rows)
            rows.append(_Row(inputs))
            if key is not None:
                shared[key] = index
        row = rows[index]
        owners.append((index, len(row.positions), count))
        first = len(inputs) - count  # position p predicts token p + 1
        row.positions.extend(range(first, len(inputs)))
        row.targets.extend(tokens[first + 1 :])
    return rows, owners


def score_sequences(
    lm: MpqJaxLM, sequences: list[list[int]], continuation_lengths: list[int], disable_tqdm: bool
) -> list[tuple[float, bool]]:
    """For each token sequence, (sum of log p over its last `continuation_length` tokens, all greedy).

    Rows run longest first, so each batch's bucket is set by its first row and the progress
    bar overestimates rather than underestimates the time left.
    """
    rows, owners = plan_rows(sequences, continuation_lengths)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
    row_scores: list[tuple[np.ndarray, np.ndarray]] = [None] * len(rows)  # type: ignore[list-item]
    bar = tqdm(total=sum(len(row.positions) for row in rows), desc="loglikelihood", unit="token", disable=disable_tqdm)
    position = 0
    while position < len(order):
        length = padded_length(len(rows[order[position]].inputs), lm.buckets)
        count = batch_rows(lm, length)
        batch = order[position : position + count]
        used = sum(len(rows[i].positions) for i in batch)
        size = padded_length(used, slot_buckets(count * length))
        inputs = np.zeros((count, length), np.int32)
        slots = np.zeros(size, np.int32)
        targets = np.zeros(size, np.int32)
        first_slot = 0
        for r, index in enumerate(batch):
            row = rows[index]
            inputs[r, : len(row.inputs)] = row.inputs
            end = first_slot + len(row.positions)
            slots[first_slot:end] = r * length + np.asarray(row.positions)
            targets[first_slot:end] = row.targets
            first_slot = end
        log_probs, greedy = score_batch(lm, inputs, slots, targets)
        first_slot = 0
        for index in batch:
            end = first_slot + len(rows[index].positions)
            row_scores[index] = (log_probs[first_slot:end], greedy[first_slot:end])
            first_slot = end
        position += len(batch)
        bar.update(used)
    bar.close()
    results = []
    for index, first, count in owners:
        log_probs, greedy = row_scores[index]
        results.append(
            (float(np.sum(log_probs[first : first + count], dtype=np.float64)), bool(np.all(greedy[first : first + count])))
        )
    return results


# -- multi-process: process 0 leads, the others follow -----------------------------------------

_STOP = 0
_SCORE = 1


def _send_to_followers(inputs: np.ndarray, slots: np.ndarray, targets: np.ndarray) -> None:
    broadcast_from_leader(np.asarray([_SCORE, *inputs.shape, slots.size], np.int32))
    broadcast_from_leader(inputs)
    broadcast_from_leader(slots)
    broadcast_from_leader(targets)


def stop_followers() -> None:
    """Process 0, after the evaluation: release the processes waiting in `follow_batches`."""
    if jax.process_count() > 1 and is_leader():
        broadcast_from_leader(np.asarray([_STOP, 0, 0, 0], np.int32))


def follow_batches(lm: MpqJaxLM) -> int:
    """Processes other than 0: run every scoring batch process 0 runs, until it stops. Returns the count."""
    if is_leader():
        raise RuntimeError("follow_batches runs on the processes other than 0; process 0 runs lm-eval")
    count = 0
    while True:
        op, rows, length, size = broadcast_from_leader(np.zeros(4, np.int32))
        if op == _STOP:
            return count
        inputs = broadcast_from_leader(np.zeros((rows, length), np.int32))
        slots = broadcast_from_leader(np.zeros(size, np.int32))
        targets = broadcast_from_leader(np.zeros(size, np.int32))
        _run_batch(lm, inputs, slots, targets)
        count += 1
