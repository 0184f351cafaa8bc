"""The supervisor's signal handler only records: it never blocks, however many signals come."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from pacsd import config
from pacsd.daemon import Supervisor


def test_signal_flood_while_the_loop_is_busy_never_blocks_the_handler(tmp_path: Path) -> None:
    sup = Supervisor(config.parse("", tmp_path / "pacsd.toml"))
    t0 = time.monotonic()
    for _ in range(50_000):  # far more than a socketpair buffer holds; nobody drains it
        sup._on_signal(signal.SIGCHLD, None)
    assert time.monotonic() - t0 < 10
    assert len(sup._signals) == 50_000
