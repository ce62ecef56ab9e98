"""Test-only (tests/execute/test_kill_moments.py): SIGKILL this process group at one named moment.

Put this folder first on ``PYTHONPATH`` and name the moment in ``PHP_RUN_TEST_KILL_AT``; every Python
process of the command (php-run and the worker it spawns) imports this module at startup, and the one
that reaches the moment kills the whole group at once, as a power cut would: nobody records anything.
The product code has no hook; the functions at the moment are replaced here.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

KILL_ENV = "PHP_RUN_TEST_KILL_AT"


def die() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def kill_on_call(owner, name: str, nth: int = 1, when=lambda *args, **kwargs: True, after: bool = False) -> None:
    """Replace ``owner.name`` so that its ``nth`` call for which ``when(*args)`` holds dies (before the
    call, or ``after`` it returned)."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                if after:
                    original(*args, **kwargs)
                die()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def half_written(path, data: bytes) -> None:
    """Die halfway through an atomic write of ``data``: its temporary holds half the bytes."""
    from php_runner.files import atomic_path

    with atomic_path(path) as temporary:
        temporary.write_bytes(data[: len(data) // 2])
        die()


def kill_in_write_atomic(module, nth: int) -> None:
    """The ``nth`` ``write_atomic`` of ``module`` dies half written."""
    original, calls = module.write_atomic, [0]

    def wrapper(path, data):
        calls[0] += 1
        if calls[0] == nth:
            half_written(path, data)
        return original(path, data)

    module.write_atomic = wrapper


def kill_in_checkpoint_save(file_name: str, nth: int) -> None:
    """The ``nth`` ``torch.save`` into ``file_name`` (last.pth or best.pth, or its temporary) dies with half
    the bytes written: the product's own save path runs up to the kill."""
    import torch

    original, calls = torch.save, [0]

    def save(obj, target, *args, **kwargs):
        name = Path(target if isinstance(target, (str, os.PathLike)) else getattr(target, "name", "")).name
        if name == file_name or name.startswith(f".{file_name}."):
            calls[0] += 1
            if calls[0] == nth:
                buffer = io.BytesIO()
                original(obj, buffer, *args, **kwargs)
                half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
                if hasattr(target, "write"):
                    target.write(half)
                    target.flush()
                else:
                    Path(target).write_bytes(half)
                die()
        return original(obj, target, *args, **kwargs)

    torch.save = save


def kill_in_registry_transaction(method: str, when) -> None:
    """``Registry.method`` dies inside its transaction, after its statements reached the database and
    before the commit."""
    from php_runner.store.registry import Registry

    original_session, original_method, armed = Registry._session, getattr(Registry, method), [False]

    @contextlib.contextmanager
    def session(self):
        with original_session(self) as opened:
            yield opened
            if armed[0]:
                opened.flush()
                die()

    def wrapper(self, *args, **kwargs):
        armed[0] = when(*args, **kwargs)
        return original_method(self, *args, **kwargs)

    Registry._session = session
    setattr(Registry, method, wrapper)


def install(moment: str) -> None:
    if moment == "cache-build":  # the 10th of 24 images decoded into the staging folder
        from php_runner.data import cache

        kill_on_call(cache, "read_image", nth=10)
    elif moment == "last-checkpoint-write":  # epoch 2's last.pth (epoch 1's is there)
        kill_in_checkpoint_save("last.pth", nth=2)
    elif moment == "best-checkpoint-write":  # epoch 1's best.pth (no last.pth yet)
        kill_in_checkpoint_save("best.pth", nth=1)
    elif moment == "evaluation":  # epoch 2's evaluation on test
        from php_runner.engine import train

        kill_on_call(train, "evaluate", nth=3)
    elif moment == "registry-write":  # epoch 2's test metrics, mid-transaction
        kill_in_registry_transaction("record_epoch", lambda run_id, epoch, split, metrics: (epoch, split) == (2, "test"))
    elif moment == "queue-claim":  # php-run claimed the run; its worker process is not started yet
        from php_runner.store.registry import Registry

        kill_on_call(Registry, "claim_next", after=True)
    elif moment == "before-results":  # training ended; nothing of its results recorded yet
        from php_runner.store.registry import Registry

        kill_on_call(Registry, "record_result")
    elif moment == "synth":  # the 10th file php-run synth writes
        from php_runner.data import synthetic

        kill_in_write_atomic(synthetic, nth=10)
    elif moment == "table-write":  # the 2nd report file php-run table writes
        from php_runner.reports import publish

        kill_in_write_atomic(publish, nth=2)
    elif moment == "embeddings-save":  # php-run evaluate --save-embeddings, mid-file
        import numpy

        def savez(handle, *args, **kwargs):
            handle.write(b"PK\x03\x04 half an archive")
            handle.flush()
            die()

        numpy.savez = savez
    else:
        raise SystemExit(f"{KILL_ENV}={moment!r}: no such moment")


if os.environ.get(KILL_ENV):
    install(os.environ[KILL_ENV])
