"""The registry's Alembic migrations (``versions/``), run by ``php_runner.registry.upgrade``."""
