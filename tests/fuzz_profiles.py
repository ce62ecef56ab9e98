"""Hypothesis profiles of the fuzz tests: ``ci`` (the default, under two minutes in all) and ``local``
(more cases); choose with ``HYPOTHESIS_PROFILE=local``."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

COMMON = {"deadline": None, "derandomize": False, "print_blob": True,
          "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                    HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=60, **{**COMMON, "derandomize": True})
settings.register_profile("local", max_examples=300, **COMMON)


def load() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name
