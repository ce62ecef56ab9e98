"""Shared pieces of the php-run command line: consoles, common options, exit codes, error handling.

Exit codes: 0 success, 1 a run failed, 2 bad input. ``InputError`` raised anywhere below a command
becomes one ``error: ...`` line on stderr and exit code 2 (see ``PhpRunGroup``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from php_runner.errors import InputError

if TYPE_CHECKING:
    from php_runner.experiment.schema import Spec

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
SYNTHETIC_ROOT = Path("data/synthetic")  # where --preset tiny expects (and the demo writes) synthetic data
REPORTS_DIR = Path("reports")
MAX_RUN_ID = 2**63 - 1  # the registry's integer ids (SQLite and PostgreSQL BIGINT)
# click's ClickException: recent Typer raises its vendored copy (typer._click), older Typer click's own.
CLICK_ERRORS = tuple({click.ClickException, *(cls for cls in typer.BadParameter.__mro__
                                               if cls.__name__ == "ClickException")})

# Redirected output (logs, CI) has no terminal to wrap at: give the wide tables room instead of
# rich's 80-column default, unless COLUMNS says otherwise.
_REDIRECTED_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
console = Console(width=_REDIRECTED_WIDTH)
err_console = Console(stderr=True)


def fail_input(message: str) -> typer.Exit:
    """Print one ``error:`` line and return the exit to raise (code 2)."""
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(EXIT_BAD_INPUT)


class PhpRunGroup(TyperGroup):
    """The top-level command group; turns ``InputError`` into one stderr line and exit code 2.

    Every sub-command (including ``data check`` and the audit, tune and import commands) runs inside
    this group's ``invoke``, so they all get the same handling.
    """

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        if not getattr(self, "_plain_metavars", False):  # Typer adds the completion options after __init__
            plain_metavars(self)
            self._plain_metavars = True
        for token in args:
            value = token.split("=", 1)[-1] if token.startswith("--") else token
            if value.isdecimal() and not value.isascii():  # int() would read them; 3 in any script is a typo here
                raise fail_input(f"{info_name}: {token!r}: write numbers with the digits 0-9")
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except CLICK_ERRORS as err:
            raise _usage_error(err, info_name) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as err:
            raise fail_input(" ".join(str(err).split())) from None
        except CLICK_ERRORS as err:  # a sub-command's own option checks (Typer/click)
            raise _usage_error(err, ctx.info_name) from None
        except OSError as err:
            # Only a path the user gave can be too long for the file system (php-run's own names are short);
            # any other OSError is left to show its traceback.
            if err.errno != errno.ENAMETOOLONG:
                raise
            raise fail_input(f"{err.filename}: name too long for the file system") from None
        except KeyboardInterrupt:
            print("interrupted; run the same command again to resume", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None


TYPE_WORDS = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "path": "PATH", "file": "FILE", "directory": "FOLDER"}


def plain_metavars(command: Any) -> None:
    """Help without Typer's ``<bool>``/``<str>`` placeholders: flags and arguments show no type, other
    options a plain word (``--preset TEXT``). Typer's parameters ignore ``metavar`` for the type column of
    flags and arguments, hence the per-instance ``display_type_rich``."""
    for sub in getattr(command, "commands", {}).values():
        plain_metavars(sub)
    for param in command.params:
        plain_metavar(param)
    original = command.get_help_option

    def help_option(ctx: Any, original: Any = original) -> Any:
        option = original(ctx)
        if option is not None:
            plain_metavar(option)
        return option

    command.get_help_option = help_option


def plain_metavar(param: Any) -> None:
    if param.param_type_name != "option" or param.is_flag:
        param.display_type_rich = lambda ctx: None
    elif param.metavar is None and hasattr(param, "display_type"):
        label = param.display_type(None).strip("<>").removeprefix("list[").removesuffix("]")
        param.metavar = TYPE_WORDS.get(label, label.upper())


def _usage_error(err: Exception, program: str | None) -> typer.Exit:
    """click's usage errors as one ``error:`` line (not Typer's boxed panel), with click's exit code."""
    if type(err).__name__ == "NoArgsIsHelpError":  # its message is the help text: shown as usual
        raise err
    context = getattr(err, "ctx", None)
    command = context.command_path if context is not None else program
    print(f"error: {command}: {' '.join(err.format_message().split())}", file=sys.stderr)
    return typer.Exit(err.exit_code)


def specs_folder() -> Path:
    """The specs shipped inside the package (``php_runner/experiments``), from any working directory."""
    from php_runner.experiment.specs import shipped_folder

    return shipped_folder()


def print_json(value: Any) -> None:
    """Machine-readable output: plain JSON on stdout, no rich markup or wrapping."""
    typer.echo(json.dumps(value, indent=2, default=str))


def list_items(text: str, option: str) -> list[str]:
    """The items of a comma-separated option value; an empty item (``1,,2``, a trailing comma) is refused."""
    parts = [part.strip() for part in text.split(",")]
    if text.strip() and not all(parts):
        raise InputError(f"{option}: empty item in {text!r}; separate the values by single commas")
    return [part for part in parts if part]


def parse_seeds(text: str | None) -> list[int] | None:
    """``"1,2,3"`` -> ``[1, 2, 3]``; None keeps the spec's seeds."""
    if text is None:
        return None
    from php_runner.experiment.schema import MAX_SEED

    parts = list_items(text, "--seeds")
    if not all(re.fullmatch(r"[0-9]+", part) for part in parts):  # ASCII digits only: int() takes any script's
        raise InputError(f"--seeds: expected comma-separated integers, got {text!r}")
    seeds = [int(part) for part in parts]
    if not seeds:
        raise InputError("--seeds: no seed given")
    if max(seeds) > MAX_SEED:
        raise InputError(f"--seeds: a seed must be at most {MAX_SEED}, got {max(seeds)}")
    return seeds


def parse_gpus(text: str | None) -> list[str] | None:
    """``"0,1"`` -> ``["0", "1"]`` (values for CUDA_VISIBLE_DEVICES); None runs one worker at a time."""
    if text is None:
        return None
    gpus = list_items(text, "--gpus")
    if not gpus or not all(re.fullmatch(r"[0-9]+", g) for g in gpus) or len(set(gpus)) != len(gpus):
        raise InputError(f"--gpus: expected distinct comma-separated GPU indices such as 0,1, got {text!r}")
    return gpus


def _check_db(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("empty URL; give an SQLAlchemy URL such as sqlite:///registry.db")
    if value is not None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except ArgumentError:
            raise typer.BadParameter(f"not an SQLAlchemy URL: {value!r}; give one such as sqlite:///registry.db") from None
    return value


def _check_device(value: str | None) -> str | None:
    from php_runner.experiment.schema import DEVICE_PATTERN

    if value is not None and not re.fullmatch(DEVICE_PATTERN, value):
        raise typer.BadParameter(f"expected auto, cpu, mps, cuda or cuda:N, got {value!r}")
    return value


def check_run_ref(value: str | None) -> str | None:
    """A RUN argument: an id (ASCII digits, within the registry's 64-bit ids) or a config-hash prefix."""
    if value is None:
        return value
    key = value.strip()
    if not key.isascii():
        raise typer.BadParameter(f"expected a run id or a config-hash prefix, got {value!r}")
    if key.isdigit() and int(key) > MAX_RUN_ID:
        raise typer.BadParameter(f"no run has id {key} (ids are at most {MAX_RUN_ID})")
    return value


def check_run_refs(values: list[str] | None) -> list[str] | None:
    """``check_run_ref`` for each value of a repeatable RUN option."""
    for value in values or ():
        check_run_ref(value)
    return values


# Common options, as reusable annotated types (defaults are given where each command declares them).
PresetOption = Annotated[
    str, typer.Option("--preset", help="Scale of the runs: 'paper' (ViT-B/16, real data) or 'tiny' (CPU, synthetic).")
]
DataRootOption = Annotated[
    Path | None, typer.Option("--data-root", help="Folder holding the dataset folders (default: the preset's).")
]
ClipWeightsOption = Annotated[
    Path | None, typer.Option("--clip-weights", help="OpenAI CLIP ViT-B/16 weights file (ViT-B-16.pt) for the paper preset.")
]
SeedsOption = Annotated[str | None, typer.Option("--seeds", help="Comma-separated seeds, e.g. 1,2,3 (default: the spec's).")]
DbOption = Annotated[
    str | None,
    typer.Option("--db", envvar="PHP_RUN_DB", help="Registry SQLAlchemy URL (default: sqlite:///registry.db).",
                 show_envvar=True, callback=_check_db),
]
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="Torch device: auto, cpu, cuda, cuda:1, ... (default: the preset's).",
                             callback=_check_device)
]
RunsPerGpuOption = Annotated[int, typer.Option(
    "--runs-per-gpu", min=1, help="Runs in flight on each GPU at once (each its own process); without --gpus, on "
    "the default device.")]
GpusOption = Annotated[
    str | None, typer.Option("--gpus", help="Run up to one worker per listed GPU in parallel, e.g. 0,1.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
OverridesArgument = Annotated[list[str] | None, typer.Argument(
    help="Overrides SECTION.FIELD=VALUE with the spec's names, e.g. train.lr=1e-5; a,b sweeps both values "
    "(like [grid]). A value given here is never replaced by the preset.", show_default=False)]


def note(message: str) -> None:
    """A message for the user (not the requested output): always on stderr."""
    err_console.print(message, highlight=False, soft_wrap=True)


def say(message: str, machine: bool = False) -> None:
    """A message (progress, "written: ..."): on stdout for a person at a terminal, on stderr when stdout
    is machine-readable (``machine``: --format/--json) or not a terminal, so piped output is only the content."""
    if machine or not sys.stdout.isatty():
        err_console.print(message, highlight=False, soft_wrap=True)
    else:
        console.print(message, highlight=False, soft_wrap=True)


def plan_spec(spec: "Spec", preset: str, datasets: list[str] | None, seeds: str | None, runtime: dict,
              overrides: list[str] | None = None) -> list:
    """The runs of ``spec`` (with the command line's overrides) under ``preset``; notes on stderr name
    each value of the user's that the preset would have changed."""
    from php_runner.experiment.specs import expand, preset_notes, with_overrides

    spec = with_overrides(spec, overrides or [])
    planned = expand(spec, preset, datasets, parse_seeds(seeds), runtime)
    for line in preset_notes(spec, preset):
        note(f"note: {line}")
    if not planned:
        raise InputError(f"spec {spec.name}: no runs for preset {preset!r} and the given datasets/seeds")
    return planned


def runtime_values(data_root: Path | None, clip_weights: Path | None, device: str | None) -> dict:
    """Command-line runtime values; None falls back to the preset's defaults."""
    return {
        "data_root": None if data_root is None else str(data_root),
        "clip_weights": None if clip_weights is None else str(clip_weights),
        "device": device,
    }


def spec_of_table(table: str) -> "Spec":
    """The shipped spec that fills ``table``."""
    from php_runner.experiment.specs import load_all_specs

    matches = [spec for spec in load_all_specs(specs_folder()).values() if spec.table == table]
    if len(matches) != 1:
        found = ", ".join(sorted(s.name for s in matches)) or "none"
        raise InputError(f"table {table!r}: expected exactly one shipped spec filling it, found {found}")
    return matches[0]


def datasets_option(dataset: str) -> list[str] | None:
    from php_runner.data.datasets import DATASET_NAMES

    if dataset == "all":
        return None
    if dataset not in DATASET_NAMES:
        raise InputError(f"--dataset: expected 'all' or one of {', '.join(DATASET_NAMES)}, got {dataset!r}")
    return [dataset]
