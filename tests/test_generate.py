"""Generation with the KV cache: every decode step's logits equal the full forward pass's at
that position (tiny models), the packed default model generates exactly what its dequantized
dense weights generate, and the CLI streams text from a saved packed folder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.infer import PROMPT_BUCKET, SamplingConfig, choose_token, generate, init_cache, model_step
from mpq_jax.models import forward


@pytest.mark.parametrize("family", ["llama", "qwen3", "llama-tied-bias"])
def test_cached_steps_match_full_forward(family, load_tiny_model):
    model = load_tiny_model(family)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.spec.vocab_size, 5).astype(np.int32)
    generated = list(generate(model.params, model.spec, prompt, 12))
    sequence = np.concatenate([prompt, generated])
    logits = np.asarray(forward(model.params, model.spec, jnp.asarray(sequence[None])))[0]
    # Greedy: each generated token is the argmax of the full forward at the previous position.
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1 : -1], axis=-1), generated)
    # And the cached logits themselves agree with the full forward, step by step.
    cache = init_cache(model.spec, 1, PROMPT_BUCKET + len(generated), jnp.float32)
    padded = np.zeros((1, PROMPT_BUCKET), np.int32)
    padded[0, : len(prompt)] = prompt
    step_logits, cache = model_step(model.params, model.spec, jnp.asarray(padded), cache, jnp.int32(0), jnp.int32(len(prompt) - 1))
    scale = np.abs(logits).max()
    np.testing.assert_allclose(np.asarray(step_logits)[0], logits[len(prompt) - 1], atol=1e-4 * scale)
    for offset, token in enumerate(generated[:-1]):
        position = len(prompt) + offset
        step_logits, cache = model_step(
            model.params, model.spec, jnp.asarray([[token]], jnp.int32), cache, jnp.int32(position), jnp.int32(0)
        )
        np.testing.assert_allclose(np.asarray(step_logits)[0], logits[position], atol=1e-4 * scale)


def test_generation_stops_at_eos(load_tiny_model):
    model = load_tiny_model("llama")
    prompt = [1, 2, 3]
    first = next(iter(generate(model.params, model.spec, prompt, 5)))
    assert list(generate(model.params, model.spec, prompt, 5, eos_ids=[first])) == [first]


def test_sampling_rules():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5]])
    key = jax.random.PRNGKey(0)
    assert int(choose_token(logits, SamplingConfig(), key)[0]) == 1
    assert int(choose_token(logits, SamplingConfig(temperature=1.0, top_k=1), key)[0]) == 1
    assert int(choose_token(logits, SamplingConfig(temperature=1.0, top_p=1e-6), key)[0]) == 1
    draws = {int(choose_token(logits, SamplingConfig(temperature=1.0, top_k=2), k)[0]) for k in jax.random.split(key, 64)}
    assert draws == {1, 3}  # only the two most likely tokens, and both occur
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


@pytest.mark.slow
def test_packed_default_model_generates_like_its_dense_weights(default_model, tmp_path, capsys):
    from mpq_jax.generate import main
    from mpq_jax.models import load_model
    from mpq_jax.packed.io import save_quantized
    from mpq_jax.models.spec import spec_to_dict
    from mpq_jax.packed.params import dequantized_params
    from mpq_jax.quant.rtn_model import quantize_model_rtn

    quantized = quantize_model_rtn(default_model.params, 4, 128)
    folder = tmp_path / "model"
    save_quantized(folder, quantized, {"spec": spec_to_dict(default_model.spec)},
                   extra_files=lambda f: default_model.tokenizer.save_pretrained(str(f)))
    packed = load_model(folder)
    prompt = default_model.tokenizer("The history of the Roman Empire")["input_ids"]
    from_packed = list(generate(packed.params, packed.spec, prompt, 12))
    from_dense = list(generate(dequantized_params(packed.params), packed.spec, prompt, 12))
    assert len(from_packed) == 12 and from_packed == from_dense

    assert main(["--model", str(folder), "--prompt", "The history of the Roman Empire", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.strip() and out.strip() in default_model.tokenizer.decode(from_packed, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_prompts_of_different_lengths_generate_side_by_side_as_alone(family, load_tiny_model):
    from mpq_jax.infer import generate_steps

    model = load_tiny_model(family)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, model.spec.vocab_size, n)) for n in (5, 17, 2)]
    alone = [list(generate(model.params, model.spec, prompt, 6)) for prompt in prompts]
    steps = list(generate_steps(model.params, model.spec, prompts, 6, prompt_len=32, cache_len=48))
    side_by_side = np.stack(steps, axis=1)  # [prompts, steps]
    assert side_by_side.tolist() == alone
