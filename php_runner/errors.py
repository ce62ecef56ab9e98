"""The error type for bad user input: specs, datasets, checkpoints, CLI arguments."""


class InputError(Exception):
    """Bad input. ``str(err)`` is one line naming the file or field; the CLI exits with code 2."""
