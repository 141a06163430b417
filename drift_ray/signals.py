"""Signal handlers kept across the engines that install their own: ray.init (SIGTERM, with one in C that
prints a stack dump) and Ray Train's fit (SIGINT, which aborts the run)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def signal_handler(signum: int, handler: Callable[[int, Any], Any] | None = None) -> Iterator[None]:
    """Within: `handler` for `signum`, where one is given; after: the Python handler from before, whatever
    was installed within. Only in the main thread, whose handlers they are; elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signum)
    if handler is not None:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        if before is not None:  # None: one installed from outside Python, which cannot be put back
            signal.signal(signum, before)
