"""The README's configuration block is every field at its default, as config.py defines it."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mpq_jax.config import RunConfig, parse_section

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_block_shows_the_defaults():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    assert parse_section(RunConfig, yaml.safe_load(block), "") == RunConfig()


def _missing_fields(cls, data: dict, where: str = "") -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    missing = []
    for field in dataclasses.fields(cls):
        if field.name not in data:
            missing.append(where + field.name)
        elif dataclasses.is_dataclass(hints[field.name]):
            missing += _missing_fields(hints[field.name], data[field.name] or {}, f"{where}{field.name}.")
    return missing


def test_readme_config_block_lists_every_field():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Configuration") :]
    block = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    assert _missing_fields(RunConfig, block) == []
