"""Artefact checksums: whether a recorded checkpoint still has its sha256 (``files.file_sha256``)."""

from __future__ import annotations

from pathlib import Path

from php_runner.files import file_sha256


def checkpoint_problem(path: str | Path, sha256: str) -> str | None:
    """None when the checkpoint file still has its recorded sha256, else what is wrong with it."""
    if not Path(path).is_file():
        return "file missing"
    if file_sha256(path) != sha256:
        return "file changed since it was recorded (sha256 differs)"
    return None
