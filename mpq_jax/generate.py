"""Command line: stream text from a model (a packed mpq-jax folder, a HF directory, a GGUF).

    python -m mpq_jax.generate --model runs/smollm2-135m-rtn-4bit/model --prompt "The capital of France is"
        [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--chat]

The packed folder written by `python -m mpq_jax.quantize` carries its tokenizer, so it
loads on its own. `--chat` wraps the prompt in the tokenizer's chat template (instruct
models). Greedy decoding unless --temperature > 0. On a backend without a Pallas kernel (CPU)
the packed weights are dequantized once when loaded; on GPU/TPU every step runs the kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time

from mpq_jax.errors import ConfigError, MpqError
from mpq_jax.infer import SamplingConfig, generate
from mpq_jax.models.checkpoint import load_model, load_tokenizer
from mpq_jax.preflight import check_model, check_tokenizer
from mpq_jax.packed.params import dequantized_params
from pallas_kernels.dispatch import kernel_backend


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: this model's tokenizer has no chat template; drop --chat")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True))


def eos_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    # Instruct models end a turn with their own token (SmolLM2: <|im_end|>).
    for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpq_jax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="packed mpq-jax folder, HF directory, .gguf, or the default model's name")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        # Everything checkable without the weights first: loading takes tens of seconds.
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        if not args.prompt.strip() and not args.chat:
            raise ConfigError("--prompt is empty; give the text to continue (or --chat to answer an empty turn)")
        checked = check_model(args.model, "--model")
        check_tokenizer(checked, "generate (to read the prompt)")
        tokenizer = load_tokenizer(checked.path)
        ids = prompt_ids(tokenizer, args.prompt, args.chat)
        if not ids:
            raise ConfigError(f"--prompt {args.prompt!r} gives no tokens; give some text")
        model = dataclasses.replace(load_model(checked.path, with_tokenizer=False), tokenizer=tokenizer)
    except (MpqError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = model.params
    if kernel_backend() is None:
        # No Pallas kernel on this backend: unpacking every layer at every decode step would
        # dominate, so dequantize once up front (the same weights; perplexity does the same).
        params = dequantized_params(params)
    start, new, shown = time.perf_counter(), [], ""
    for token in generate(params, model.spec, ids, args.max_new_tokens, sampling=sampling,
                          eos_ids=eos_ids(model.tokenizer), seed=args.seed):
        new.append(token)
        # Decode the whole continuation each time: a multi-byte character may span tokens.
        text = model.tokenizer.decode(new, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)
        shown = text
    seconds = time.perf_counter() - start
    print(f"\n[{len(new)} tokens in {seconds:.1f} s, {len(new) / seconds:.1f} tokens/s including compilation]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
