"""Provenance of a run: the source tree's git state, library versions, device, host and command line."""

from __future__ import annotations

import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the source tree php-run runs from, or (None, None) outside a git checkout."""
    source = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(changes)


def provenance_info(device: str, command: str | None) -> dict[str, Any]:
    import torch
    import torchvision

    import php_runner

    commit, dirty = git_state()
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "php_run": php_runner.__version__,
        "device": device_name, "host": socket.gethostname(), "command": command,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def command_line() -> str:
    """The invoking command line, quoted, for provenance."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
