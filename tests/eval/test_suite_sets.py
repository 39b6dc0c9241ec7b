"""A user's own text file as a perplexity set: how a set name is recognised as a path, scoring
by the WikiText-2 windows protocol on the tiny model, the pre-flight errors (each naming
eval.perplexity.sets and the file), and the FP-baseline cache key covering the file's content."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from mpq_jax.config import EvalConfig, PerplexityConfig, TasksConfig, load_config
from mpq_jax.data.text import names_text_file
from mpq_jax.errors import ConfigError
from mpq_jax.eval.perplexity import make_windows, perplexity
from mpq_jax.eval.suite import check_inputs, eval_data_files, evaluate
from mpq_jax.fingerprint import eval_fingerprint

SEQ_LEN = 16
EOS = 210  # the tiny model's last token id, never produced by CharTokenizer


class CharTokenizer:
    """One token per character, inside the tiny model's 211-token vocabulary."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        assert not add_special_tokens
        return {"input_ids": [ord(c) % 200 for c in text]}


TEXT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 characters: 8 windows of 16


def eval_config(*sets: str, **perplexity) -> EvalConfig:
    settings = dict(sets=sets, seq_len=SEQ_LEN, max_windows=3) | perplexity
    return EvalConfig(perplexity=PerplexityConfig(**settings), tasks=TasksConfig(), compare_fp=False)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny_model(load_tiny_model):
    return dataclasses.replace(load_tiny_model("llama"), tokenizer=CharTokenizer())


# --- recognising a path ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["notes.txt", "docs.jsonl", "NOTES.TXT", "data/notes", "./x.txt", "/abs/t.jsonl", "~/t.txt"])
def test_paths_are_recognised(name):
    assert names_text_file(name)


@pytest.mark.parametrize("name", ["wikitext2", "web", "wikipedia", "code", "qa", "arxiv", "github", "notes.json"])
def test_names_are_not_paths(name):
    assert not names_text_file(name)


def test_config_accepts_paths_and_keeps_the_unknown_name_error(tmp_path):
    (tmp_path / "ok.yaml").write_text("eval:\n  perplexity:\n    sets: [wikitext2, my/notes, docs.jsonl, code]\n")
    assert load_config(tmp_path / "ok.yaml").eval.perplexity.sets == ("wikitext2", "my/notes", "docs.jsonl", "code")
    (tmp_path / "bad.yaml").write_text("eval:\n  perplexity:\n    sets: [wikitext2, github]\n")
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: unknown set 'github'; choose from wikitext2, web.*\.txt or \.jsonl"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("eval:\n  perplexity:\n    sets: [notes.txt, ./notes.txt]\n")
    with pytest.raises(ConfigError, match="eval.perplexity.sets: a set is listed twice"):
        load_config(tmp_path / "twice.yaml")


# --- scoring -----------------------------------------------------------------------------


def test_txt_set_scores_like_wikitext2(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # a relative path is read from the current directory
    ours = evaluate(tiny_model.params, tiny_model, eval_config("notes.txt"))["perplexity"]
    assert list(ours) == ["notes.txt"]  # reported under the path as written
    # The same file through the WikiText-2 path: identical windows through the same program.
    wiki = evaluate(tiny_model.params, tiny_model, eval_config("wikitext2", wikitext2_path="notes.txt"))["perplexity"]
    assert math.isfinite(ours["notes.txt"]["ppl"]) and ours["notes.txt"]["windows"] == 3
    assert ours["notes.txt"] | {"seconds": 0, "tokens_per_s": 0} == wiki["wikitext2"] | {"seconds": 0, "tokens_per_s": 0}


def test_jsonl_set_scores_its_eos_joined_texts(tiny_model, tmp_path):
    texts = [TEXT[:40], TEXT[40:95], TEXT[95:]]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    ours = evaluate(tiny_model.params, tiny_model, eval_config(path, max_windows=0))["perplexity"][path]
    # Expected stream built by hand: the texts' characters with EOS between texts, as for the heldout splits.
    stream = np.asarray(sum(([ord(c) % 200 for c in t] + [EOS] for t in texts), [])[:-1], dtype=np.int32)
    expected = perplexity(tiny_model.params, tiny_model.spec, make_windows(stream, SEQ_LEN), progress=False)
    assert math.isfinite(ours["ppl"]) and ours["windows"] == len(stream) // SEQ_LEN == 8
    assert ours["ppl"] == expected.ppl


# --- pre-flight errors -------------------------------------------------------------------


def test_missing_file_names_the_field_and_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: gone/notes.txt: .*gone/notes.txt not found .*current directory"):
        check_inputs(eval_config("gone/notes.txt"))


def test_unknown_suffix_behind_a_separator(tmp_path):
    (tmp_path / "notes.csv").write_text(TEXT, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: .*notes.csv: cannot tell the format .*\.txt file"):
        check_inputs(eval_config(str(tmp_path / "notes.csv")))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": TEXT}) + "\n\n{broken\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: .*docs.jsonl: .*docs.jsonl:3: not a JSON object"):
        check_inputs(eval_config(str(path)))


def test_missing_field_is_named_with_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": TEXT}, {"body": TEXT}])
    fix = r"put each line's text under the key \"text\" \(this record has: body\)"
    with pytest.raises(ConfigError, match=rf"eval.perplexity.sets: .*docs.jsonl:2: no field 'text'; {fix}"):
        check_inputs(eval_config(path))


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(TEXT.encode() + b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: .*notes.txt is not UTF-8 text .*save it as UTF-8"):
        check_inputs(eval_config(str(path)))


def test_too_short_file_is_refused_before_and_when_tokenized(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * (SEQ_LEN - 1), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: .*short.txt: .*15 bytes of text, too short .*seq_len=16"):
        check_inputs(eval_config(str(path)))  # pre-flight, no tokenizer: fewer bytes than one window
    # Long enough in bytes but not in tokens: counted exactly once a tokenizer is at hand.
    path.write_text("é" * (SEQ_LEN - 1), encoding="utf-8")  # 30 bytes, 15 tokens
    check_inputs(eval_config(str(path)))
    with pytest.raises(ConfigError, match=r"eval.perplexity.sets: .*short.txt: text has 15 tokens, fewer than one window"):
        check_inputs(eval_config(str(path)), tokenizer=CharTokenizer())
    path.write_text("é" * SEQ_LEN, encoding="utf-8")
    check_inputs(eval_config(str(path)), tokenizer=CharTokenizer())


# --- the FP-baseline cache key -----------------------------------------------------------


def test_cache_key_follows_the_file_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "notes.txt"
    path.write_text(TEXT, encoding="utf-8")
    config = eval_config(str(path))
    assert path in eval_data_files(config)

    def key():
        return eval_fingerprint({"files": {}, "dtype": "float32"}, config, eval_data_files(config))

    before = key()
    assert key() == before
    path.write_text(TEXT.replace("fox", "cat"), encoding="utf-8")  # same size, new content
    assert key() != before


def test_cache_key_counts_two_files_with_the_same_name(tmp_path, monkeypatch):
    """Two sets whose files share folder and file name (a/x.txt, b/a/x.txt) both enter the
    key: changing either one changes it."""
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "x.txt", tmp_path / "b" / "a" / "x.txt"
    for path in (first, second):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(TEXT, encoding="utf-8")
    config = dataclasses.replace(eval_config(str(first)), perplexity=dataclasses.replace(eval_config(str(first)).perplexity, sets=(str(first), str(second))))

    def key():
        return eval_fingerprint({"files": {}, "dtype": "float32"}, config, eval_data_files(config))

    before = key()
    second.write_text(TEXT.replace("fox", "cat"), encoding="utf-8")
    assert key() != before
