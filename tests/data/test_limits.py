"""The stated input limits (issue 24): depth counting against independent references, env overrides,
and pid gaps found without materialising 0..max."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from php_runner.data.datasets import _first_gaps
from php_runner.data.limits import (
    LIMITS,
    MAX_NESTING,
    LimitError,
    check_input_size,
    json_depth,
    limits_table,
    value_depth,
)

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('ab[]{}"\\ \n\u00e9')),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=20,
)


def reference_depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    return 0


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_json_depth_and_value_depth_match_a_recursive_reference(value):
    text = json.dumps(value, ensure_ascii=False).encode()
    assert json_depth(text) == reference_depth(value) == value_depth(value)


def test_json_depth_of_a_very_deep_text_needs_no_recursion():
    assert json_depth(b"[" * 200_000 + b"]" * 200_000) == 200_000


def test_limits_are_overridable_and_a_bad_override_is_one_line(monkeypatch):
    monkeypatch.setenv(MAX_NESTING.env, "7")
    assert MAX_NESTING.value() == 7
    for bad in ("seven", "0", "-3"):  # a limit of 0 would refuse every input
        monkeypatch.setenv(MAX_NESTING.env, bad)
        with pytest.raises(LimitError, match=MAX_NESTING.env):
            MAX_NESTING.value()


def test_input_size_limit_names_the_bytes_needed():
    check_input_size(384, 128, rows=10)
    with pytest.raises(LimitError, match="would need 3000000000000 bytes"):
        check_input_size(100_000, 100_000, rows=100)


def test_the_limits_table_lists_every_limit():
    table = limits_table()
    assert all(limit.env in table and f"{limit.default:,}" in table for limit in LIMITS)


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(min_value=0, max_value=60), min_size=1))
def test_first_gaps_are_the_first_missing_pids(pids):
    ordered = sorted(pids)
    missing = sorted(set(range(ordered[-1] + 1)) - pids)
    gaps = _first_gaps(ordered)
    assert gaps[:3] == missing[:3] and (len(gaps) > 3) == (len(missing) > 3)


def test_first_gaps_of_a_huge_pid_are_found_at_once():
    assert _first_gaps([0, 10**12]) == [1, 2, 3, 4]


@settings(max_examples=100, deadline=None)
@given(JSON_VALUES, st.integers(1, 7))
def test_json_depth_is_the_same_when_scanned_in_small_chunks(value, chunk):
    from php_runner.data import limits

    text = json.dumps(value).encode()
    whole = json_depth(text)
    saved, limits._SCAN_CHUNK = limits._SCAN_CHUNK, chunk
    try:
        assert json_depth(text) == whole == reference_depth(value)
    finally:
        limits._SCAN_CHUNK = saved


def test_json_depth_is_linear_on_unterminated_strings():
    """Hostile text where a naive string pattern retries from every quote (quadratic: minutes here)."""
    import time

    started = time.perf_counter()
    assert json_depth(b'["' + b'"\\' * 200_000) == 1
    assert time.perf_counter() - started < 2.0
