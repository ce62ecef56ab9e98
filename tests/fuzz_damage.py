"""What the fuzz tests share: the clean-exit contract, file snapshots and byte-level damage."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hypothesis import event
from hypothesis import strategies as st

ERROR_PREFIXES = ("error: ", "problem: ")
STATUS_LINES = ("caching ", "rebuilding image cache: ")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def assert_clean(code: int, err: str) -> None:
    """Exit 0, or exit 2 with error lines only (one per problem) and the cache's status lines."""
    assert code in (0, 2) and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert all(line.startswith(ERROR_PREFIXES + STATUS_LINES) for line in lines), err
    if code == 2:
        assert any(line.startswith(ERROR_PREFIXES) for line in lines), err
    event(f"exit {code}")


BYTE_DAMAGES = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("replace"), st.binary(max_size=256)),
)


def damaged(data: bytes, damage: tuple) -> bytes:
    """``data`` truncated, extended, with one byte flipped, or replaced, as ``damage`` (from BYTE_DAMAGES) says."""
    kind = damage[0]
    if kind == "truncate":
        return data[: int(len(data) * damage[1])]
    if kind == "append":
        return data + damage[1]
    if kind == "flip":
        if not data:
            return data
        at = min(int(len(data) * damage[1]), len(data) - 1)
        return data[:at] + bytes([data[at] ^ damage[2]]) + data[at + 1:]
    return damage[1]


def damage_bytes(path: Path, damage: tuple) -> None:
    path.write_bytes(damaged(path.read_bytes(), damage))
    event(f"damage {damage[0]}")
