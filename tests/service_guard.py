"""How a test reacts to an absent service (PostgreSQL, Slurm)."""

from __future__ import annotations

import os

import pytest

# .ci/run sets it: there a missing service is a failure, not a skip, so CI always runs the service tests.
REQUIRE_SERVICES_ENV = "PHP_RUN_REQUIRE_SERVICES"


def service_missing(reason: str) -> None:
    """Skip a test whose service is absent (a laptop), or fail it where services are required (CI)."""
    if os.environ.get(REQUIRE_SERVICES_ENV) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_SERVICES_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)
