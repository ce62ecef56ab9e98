"""Artefact checksums: the sha256 of a file and whether a recorded checkpoint still has it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_problem(path: str | Path, sha256: str) -> str | None:
    """None when the checkpoint file still has its recorded sha256, else what is wrong with it."""
    if not Path(path).is_file():
        return "file missing"
    if file_sha256(path) != sha256:
        return "file changed since it was recorded (sha256 differs)"
    return None
