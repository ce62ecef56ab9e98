"""The registry's Alembic migrations (``versions/``), run by ``php_runner.store.registry.upgrade``."""
