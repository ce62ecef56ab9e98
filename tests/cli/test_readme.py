"""Every ``php-run`` command in README.md's code blocks parses (its command and option names exist),
and the cheap ones (reading specs, an empty registry) run and exit 0."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
CHEAP = {"ls", "cat", "validate", "table", "status", "--version", "db"}


def readme_commands() -> list[list[str]]:
    """The php-run command lines of the README's fenced code blocks, continuations joined, comments and
    ``...`` placeholders dropped."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("php-run"):
                commands.append([token for token in shlex.split(line)[1:] if token != "..."])
    return commands


def test_the_readme_has_commands_and_no_stale_spec_path():
    commands = readme_commands()
    assert len(commands) >= 10
    assert not any("experiments/" in token for command in commands for token in command)


@pytest.mark.parametrize("args", readme_commands(), ids=lambda args: " ".join(args[:3]))
def test_each_readme_command_parses(cli, args):
    code, out, err = cli(*args, "--help")
    assert code == 0, f"php-run {' '.join(args)}: {err}"
    assert "Usage" in out


@pytest.mark.parametrize("args", [a for a in readme_commands() if a and a[0] in CHEAP],
                         ids=lambda args: " ".join(args[:3]))
def test_the_cheap_readme_commands_run(cli, args):
    code, _out, err = cli(*args)
    assert code == 0, f"php-run {' '.join(args)}: {err}"
