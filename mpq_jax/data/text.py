"""Text to token ids: the one place where documents become the int32 token streams that
calibration samples from and perplexity scores.

`tokenize_text` turns one text into tokens (no BOS/EOS added); `token_stream` joins several
documents into one stream with EOS between them; `read_jsonl` reads one document per JSON line
of a file; `names_text_file` is the rule by which a perplexity set names a user's file rather
than a built-in set.

Not for: which texts to use (calibration sources: `mpq_jax.data.calibration`; perplexity sets:
`mpq_jax.eval.suite`), where the shared corpora live (`mpq_jax.data.paths`), or cutting a
stream into windows (`sample_windows`, `make_windows`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mpq_jax.errors import ConfigError

TEXT_FILE_SUFFIXES = (".txt", ".jsonl")  # one whole text; one JSON object per line


def names_text_file(name: str) -> bool:
    """Whether a perplexity set name is a path to a text file: it ends in .txt or .jsonl (any
    case) or contains a path separator. Built-in set names have neither."""
    return name.lower().endswith(TEXT_FILE_SUFFIXES) or "/" in name or os.sep in name


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """The whole text as one int32 token stream, no BOS/EOS added."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """The documents' tokens in order, as one int32 stream with EOS between documents (when the
    tokenizer has one); empty documents are skipped, and one document is just `tokenize_text`."""
    eos = getattr(tokenizer, "eos_token_id", None)
    pieces = []
    for document in documents:
        if not document:
            continue
        # Documents are separate texts: EOS between them marks the boundary the way the model
        # saw it in pre-training, instead of running one text into the next.
        if pieces and eos is not None:
            pieces.append(np.asarray([eos], dtype=np.int32))
        pieces.append(tokenize_text(tokenizer, document))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def read_jsonl(path: Path, text_field: str, field_fix: str) -> list[str]:
    """The `text_field` string of every JSON line of `path`, in file order; blank lines are skipped.

    A line that is not JSON, lacks the field or holds a non-string there raises ConfigError
    naming `path:line`; `field_fix` says how to point at another field (it differs by caller).
    UnicodeDecodeError and OSError propagate, for the caller to name its config field.
    """
    documents = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():  # a trailing or stray blank line is not a document
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{line_number}: not a JSON object ({exc.msg}); write one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ConfigError(
                    f"{path}:{line_number}: no field {text_field!r}; {field_fix}"
                    + (f" (this record has: {', '.join(map(str, record))})" if isinstance(record, dict) else "")
                )
            if not isinstance(record[text_field], str):
                raise ConfigError(f"{path}:{line_number}: field {text_field!r} is {type(record[text_field]).__name__}, not text")
            documents.append(record[text_field])
    return documents
