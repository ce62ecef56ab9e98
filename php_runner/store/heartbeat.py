"""The heartbeat of a claimed run: a background thread that keeps the claim alive and notices when it is lost."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from php_runner.store.registry import Registry

if TYPE_CHECKING:
    pass


HEARTBEAT_INTERVAL_S = 15.0


class Heartbeat:
    """Refreshes the run's heartbeat from a background thread; notices when the claim is lost."""

    def __init__(self, registry: Registry, run_id: int, worker: str, interval: float = HEARTBEAT_INTERVAL_S):
        self.registry, self.run_id, self.worker, self.interval = registry, run_id, worker, interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="php-run-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        if not self.registry.heartbeat(self.run_id, self.worker):
            self.lost.set()

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
