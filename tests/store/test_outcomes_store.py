"""Per-query outcomes in the registry: stored per evaluation, attached to result rows, upgraded from 0004."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect

from php_runner.engine.metrics import QueryOutcomes
from php_runner.errors import InputError
from php_runner.experiment.schema import PlannedRun
from php_runner.store.database import current_revision, head_revision, upgrade
from php_runner.store.registry import Registry


def outcomes(seed: int, queries: int = 12) -> QueryOutcomes:
    generator = np.random.default_rng(seed)
    return QueryOutcomes(
        first_rank=generator.integers(1, 20, queries).astype(np.int32),
        average_precision=generator.uniform(0.05, 1.0, queries),
        inverse_negative_penalty=generator.uniform(0.05, 1.0, queries),
        query_pid=np.repeat(np.arange(queries // 3), 3).astype(np.int64),
    )


def planned(seed: int = 1) -> PlannedRun:
    return PlannedRun(config={"model": {"cnum": 9}, "train": {"seed": seed}}, config_hash=f"{seed:064x}",
                      spec_name="cnum", table="cnum", row_label="9", dataset="RSTPReid", seed=seed, preset="tiny")


def test_result_rows_carry_the_outcomes_of_the_evaluation_each_result_names(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    run = registry.plan_run(planned())
    for epoch in (1, 2):
        registry.record_outcomes(run.id, "evaluation", epoch, "test", outcomes(epoch))
        registry.record_outcomes(run.id, "evaluation", epoch, "val", outcomes(10 + epoch))
    registry.record_result(run.id, "best-on-test", 2, "test", {"R1": 1.0})
    registry.record_result(run.id, "last", 1, "test", {"R1": 1.0})
    registry.record_audit(run.id, {"r1_gap": 0.0}, {"audit-ordered": outcomes(20), "audit-shuffled-0": outcomes(21)})
    registry.mark_done(run.id)
    rows = {row.rule: row for row in registry.result_rows("cnum")}
    assert rows["best-on-test"].outcomes == outcomes(2) and rows["last"].outcomes == outcomes(1)
    assert rows["last"].shuffled_outcomes == outcomes(21) and rows["last"].run_id == run.id
    assert registry.outcomes(run.id, "audit-ordered", 0, "test") == outcomes(20)
    registry.record_outcomes(run.id, "evaluation", 2, "test", outcomes(3))  # a resumed epoch replaces its outcomes
    assert registry.outcomes(run.id, "evaluation", 2, "test") == outcomes(3)
    assert registry.outcomes(run.id, "evaluation", 5, "test") is None
    registry.close()


def test_a_damaged_outcomes_blob_is_bad_input_naming_the_row(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    registry = Registry(url)
    run = registry.plan_run(planned())
    registry.record_outcomes(run.id, "evaluation", 1, "test", outcomes(1))
    with registry.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE query_outcomes SET data = x'00ff'")
    with pytest.raises(InputError, match="table query_outcomes, row 1"):
        registry.outcomes(run.id, "evaluation", 1, "test")
    registry.close()


def test_a_registry_at_the_previous_head_upgrades_and_its_runs_have_no_outcomes(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    engine = create_engine(url)
    assert upgrade(engine, target="0004") == "0004"
    with engine.begin() as conn:
        assert "query_outcomes" not in inspect(conn).get_table_names()
        conn.exec_driver_sql(
            "INSERT INTO runs (id, config_hash, config, kind, dataset, spec_name, table_name, row_label, seed, preset, "
            "status, created_at, attempts) VALUES (1, 'ab', '{}', 'trained', 'RSTPReid', 'cnum', 'cnum', '9', 1, "
            "'tiny', 'done', 0.0, 1)")
        conn.exec_driver_sql("INSERT INTO run_labels (run_id, spec_name, table_name, row_label) "
                             "VALUES (1, 'cnum', 'cnum', '9')")
        conn.exec_driver_sql("INSERT INTO results (run_id, rule, epoch, split, metrics) "
                             "VALUES (1, 'best-on-test', 1, 'test', '{\"R1\": 50.0}')")
    engine.dispose()
    registry = Registry(url)
    with registry.engine.connect() as conn:
        assert current_revision(conn) == head_revision() == "0005"
    [row] = registry.result_rows("cnum")
    assert row.metrics == {"R1": 50.0} and row.outcomes is None and row.shuffled_outcomes is None
    registry.close()
