"""The YAML schema: defaults run the default model, and every mistake names its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpq_jax.config import RunConfig, load_config
from mpq_jax.errors import ConfigError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    assert isinstance(load_config(path), RunConfig)


def test_defaults_quantize_default_model(tmp_path):
    config = load_config(write(tmp_path, "{}\n"))
    assert config.model == "smollm2-135m-instruct"
    assert (config.quantization.method, config.quantization.bits, config.quantization.group_size) == ("rtn", 4, 128)
    assert config.eval.perplexity.seq_len == 2048 and config.eval.perplexity.sets == ("wikitext2",)
    assert config.eval.tasks.names == () and config.eval.compare_fp


def test_eval_section_parses_sets_and_tasks(tmp_path):
    text = (
        "eval:\n  perplexity:\n    sets: [wikitext2, code]\n"
        "  tasks:\n    names: [local_tasks, local_gsm8k]\n    limit: 50\n    limits: {local_gsm8k: 5}\n"
        "  compare_fp: false\n"
    )
    config = load_config(write(tmp_path, text))
    assert config.eval.perplexity.sets == ("wikitext2", "code")
    assert config.eval.tasks.names == ("local_tasks", "local_gsm8k") and config.eval.tasks.limits == {"local_gsm8k": 5}
    assert config.eval.tasks.limit == 50 and not config.eval.compare_fp


@pytest.mark.parametrize(
    "text, field, hint",
    [
        ("quantization:\n  bitz: 4\n", "quantization.bitz", "allowed fields: method, bits"),
        ("quantization:\n  method: awq\n", "quantization.method", "none, rtn"),
        ("quantization:\n  bits: four\n", "quantization.bits", "expected int"),
        ("quantization:\n  bits: true\n", "quantization.bits", "expected int"),
        ("quantization:\n  bits: 9\n", "quantization.bits", "2..8"),
        ("quantization:\n  group_size: 0\n", "quantization.group_size", "positive"),
        ("dtype: float16\n", "dtype", "float32, bfloat16"),
        ("eval:\n  perplexity:\n    seq_len: 1\n", "eval.perplexity.seq_len", "at least 2"),
        ("eval: 3\n", "eval", "expected a mapping"),
        ("modle: x\n", "modle", "allowed fields: model"),
        ("quantization:\n  method: amlq\n  amlq:\n    target_bpw: 0.5\n", "quantization.amlq.target_bpw", "out of range"),
        ("quantization:\n  method: amlq\n  amlq:\n    presets: [{group_size: 48, bits: {2: 1.0}}]\n",
         "quantization.amlq.presets", "[0]: group_size must be one of (32, 64, 128)"),
        ("quantization:\n  method: amlq\n  amlq:\n    presets: [{group_size: 64, bits: {3: 0.5, 2: 0.4}}]\n",
         "quantization.amlq.presets", "sum to 1"),
        ("quantization:\n  method: amlq\n  amlq:\n    alpha_grid: [0.0, 1.5]\n", "quantization.amlq.alpha_grid", "[0, 1]"),
        ("quantization:\n  method: amlq\n  amlq:\n    lowrank_bpw: [0.0]\n", "quantization.amlq.lowrank_bpw", "positive"),
        ("quantization:\n  amlq:\n    ranks: [32]\n", "quantization.amlq.ranks", "allowed fields: target_bpw"),
        ("eval:\n  perplexity:\n    sets: [wikitext2, github]\n", "eval.perplexity.sets", "wikitext2, web, wikipedia"),
        ("eval:\n  perplexity:\n    sets: [code, code]\n", "eval.perplexity.sets", "listed twice"),
        ("eval:\n  tasks:\n    limit: -1\n", "eval.tasks.limit", ">= 0"),
        ("eval:\n  tasks:\n    limits: {local_gsm8k: two}\n", "eval.tasks.limits.local_gsm8k", "expected int"),
        ("eval:\n  tasks:\n    tasks: [local_piqa]\n", "eval.tasks.tasks", "allowed fields: names"),
    ],
)
def test_mistakes_name_the_field(tmp_path, text, field, hint):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert field in str(info.value) and hint in str(info.value) and "run.yaml" in str(info.value)


def test_amlq_section_parses_presets(tmp_path):
    from mpq_jax.quant.amlq import DEFAULT_PRESETS, presets_from_config

    text = (
        "quantization:\n  method: amlq\n  amlq:\n    target_bpw: 2.9\n    lowrank: false\n"
        "    presets:\n      - {group_size: 64, bits: {3: 0.5, 2: 0.5}}\n      - {group_size: 128, bits: {4: 1}}\n"
    )
    a = load_config(write(tmp_path, text)).quantization.amlq
    assert (a.target_bpw, a.lowrank) == (2.9, False)
    presets = presets_from_config(a.presets)
    assert [p.name for p in presets] == ["3b:0.5+2b:0.5 g64", "4b g128"]
    assert presets_from_config(None) == DEFAULT_PRESETS


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "quantization: [\n"))


def test_int_accepted_where_float_expected(tmp_path):
    # None of today's fields is a float; keep the rule itself tested through the parser.
    from dataclasses import dataclass

    from mpq_jax.config import parse_section

    @dataclass(frozen=True, kw_only=True)
    class Section:
        alpha: float = 0.5

    assert parse_section(Section, {"alpha": 1}, "x").alpha == 1.0
    with pytest.raises(ConfigError, match="x.alpha"):
        parse_section(Section, {"alpha": "big"}, "x")


def test_tuple_and_mapping_fields(tmp_path):
    from dataclasses import dataclass

    from mpq_jax.config import parse_section

    @dataclass(frozen=True, kw_only=True)
    class Section:
        names: tuple[str, ...] = ("a",)
        paths: dict[str, str] | None = None

    parsed = parse_section(Section, {"names": ["web", "code"], "paths": {"web": "/x.jsonl"}}, "calibration")
    assert parsed.names == ("web", "code") and parsed.paths == {"web": "/x.jsonl"}
    assert parse_section(Section, {"names": "web"}, "calibration").names == ("web",)
    with pytest.raises(ConfigError, match=r"calibration.names\[1\]: expected str"):
        parse_section(Section, {"names": ["web", 3]}, "calibration")
    with pytest.raises(ConfigError, match="calibration.paths: expected a mapping"):
        parse_section(Section, {"paths": ["x"]}, "calibration")


QAT_ON = "quantization: {method: rtn, bits: 2}\nqat:\n  enabled: true\n"


@pytest.mark.parametrize(
    "text, field",
    [
        (QAT_ON + "  block: {samples: 0}\n", "qat.block.samples"),
        (QAT_ON + "  block: {batch_size: 100}\n", "qat.block.batch_size"),
        (QAT_ON + "  block: {lr_quant: -1.0e-3}\n", "qat.block.lr_quant"),
        (QAT_ON + "  e2e: {effective_batch: 3, batch_size: 2}\n", "qat.e2e.effective_batch"),
        (QAT_ON + "  e2e: {samples: 8, effective_batch: 32}\n", "qat.e2e.effective_batch"),
        (QAT_ON + "  e2e: {trainable: everything}\n", "qat.e2e.trainable"),
        (QAT_ON + "  e2e: {warmup: 1.5}\n", "qat.e2e.warmup"),
        (QAT_ON + "  e2e: {clip_norm: -1.0}\n", "qat.e2e.clip_norm"),
        (QAT_ON + "  dtype: float16\n", "qat.dtype"),
        (QAT_ON + "  seq_len: 1\n", "qat.seq_len"),
        (QAT_ON + "  checkpoint_every: -2\n", "qat.checkpoint_every"),
        (QAT_ON + "  block: {enabled: false}\n  e2e: {enabled: false}\n", "qat:"),
        (QAT_ON + "  block: {epochs: 2.5}\n", "qat.block.epochs"),
        ("quantization: {method: none}\nqat: {enabled: true}\n", "qat.enabled"),
    ],
)
def test_qat_mistakes_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_qat_section_parses(tmp_path):
    config = load_config(write(tmp_path, QAT_ON + "  block: {samples: 8, lr_weight: 0}\n  e2e: {trainable: step_sizes, samples: 32}\n"))
    assert config.qat.enabled and config.qat.block.samples == 8 and config.qat.block.lr_weight == 0.0
    assert config.qat.e2e.trainable == "step_sizes" and config.qat.block.epochs == 2
