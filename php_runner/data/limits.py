"""The stated limits on untrusted inputs, in one table (the README's "Limits" section lists them).

Each limit is checked where its input enters (parse, open, allocate) so that a hostile or damaged
file gives a one-line ``LimitError`` naming the file and the limit instead of a RecursionError,
MemoryError or Pillow's DecompressionBombError. Every default leaves ample room for the three
official datasets; a user who really needs more sets the environment variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from php_runner.errors import InputError


class LimitError(InputError):
    """An input larger or deeper than a stated limit."""


@dataclass(frozen=True)
class Limit:
    name: str
    default: int
    env: str
    what: str

    def value(self) -> int:
        """The limit in force: ``$env`` when set to a positive integer, else the default."""
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default
        if not (text.isascii() and text.isdecimal()) or int(text) < 1:
            raise LimitError(f"${self.env}: expected a positive integer, got {text!r}")
        return int(text)


LIMITS = (
    Limit("JSON/YAML nesting depth", 64, "PHP_RUN_MAX_NESTING",
          "annotation files and configs.yaml (the official formats need 3)"),
    Limit("annotation file size (bytes)", 2 * 2**30, "PHP_RUN_MAX_ANNOTATION_BYTES",
          "the dataset's annotation JSON, checked before it is read"),
    Limit("person id", 10**7, "PHP_RUN_MAX_PERSON_ID",
          "the 'id' field of an annotation entry (the ID loss sizes its classifier by the ids)"),
    Limit("image pixels", 89_478_485, "PHP_RUN_MAX_IMAGE_PIXELS",
          "width x height of a dataset image, read from its header before decoding (Pillow's default)"),
    Limit("model input pixels", 4096 * 4096, "PHP_RUN_MAX_INPUT_PIXELS",
          "height x width of the model input / image cache size (the paper's is 384x128)"),
)
MAX_NESTING, MAX_ANNOTATION_BYTES, MAX_PERSON_ID, MAX_IMAGE_PIXELS, MAX_INPUT_PIXELS = LIMITS

# A string, or an unterminated one running to the end: every quote starts a match that cannot fail, and
# the possessive repeat never backtracks, so the scan is linear even on hostile text such as '"\\' * n.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_OPENERS, _CLOSERS = b"[{", b"]}"
_SCAN_CHUNK = 1 << 24


def json_depth(text: bytes) -> int:
    """The deepest bracket nesting of a JSON text, found without recursion (strings are skipped)."""
    codes = np.frombuffer(_JSON_STRING.sub(b'""', text), dtype=np.uint8)
    deepest, depth = 0, 0
    for start in range(0, len(codes), _SCAN_CHUNK):  # in chunks: bounded memory for a large file
        chunk = codes[start:start + _SCAN_CHUNK]
        steps = np.zeros(len(chunk), dtype=np.int64)
        for opener, closer in zip(_OPENERS, _CLOSERS):
            steps[chunk == opener] = 1
            steps[chunk == closer] = -1
        running = np.cumsum(steps) + depth
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
    return deepest


def value_depth(value: object) -> int:
    """The nesting depth of parsed lists and mappings (a scalar has 0), without recursion; stops counting
    once past ``MAX_NESTING``."""
    limit = MAX_NESTING.value()
    deepest, pending, seen = 0, [(value, 0)], set()
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None or (id(item), depth) in seen:  # YAML aliases share one object many times
            continue
        seen.add((id(item), depth))
        deepest = max(deepest, depth + 1)
        if deepest > limit:  # deep enough to refuse; no need to walk the rest
            return deepest
        pending.extend((child, depth + 1) for child in children)
    return deepest


def check_input_size(height: int, width: int, rows: int = 1) -> None:
    """Refuse a model input / cache size above ``MAX_INPUT_PIXELS`` before anything is allocated."""
    limit = MAX_INPUT_PIXELS.value()
    if height * width > limit:
        needed = rows * height * width * 3
        raise LimitError(f"image size {height}x{width}: {height * width} pixels per image exceeds the limit of "
                         f"{limit} (${MAX_INPUT_PIXELS.env}); {rows} cached images would need {needed} bytes")


def limits_table() -> str:
    """The README's limits table in Markdown."""
    lines = ["| limit | default | override | applies to |", "|---|---|---|---|"]
    lines += [f"| {limit.name} | {limit.default:,} | `{limit.env}` | {limit.what} |" for limit in LIMITS]
    return "\n".join(lines)
