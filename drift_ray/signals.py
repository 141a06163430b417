"""Signal handlers kept across the engines that install their own: ray.init (SIGTERM, with one in C that
prints a stack dump, then SystemExit) and Ray Train's fit (SIGINT, which aborts the run); and SIGTERM raised
as a KeyboardInterrupt, told apart from Ctrl-C's."""

from __future__ import annotations

import contextlib
import os
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`) during a command: it ends as Ctrl-C does,
    leaving what the stages finished for a rerun."""


# Set by the SIGTERM handler: Ray, waiting in ray.get, turns what a handler raises into a bare KeyboardInterrupt.
_TERMINATED = threading.Event()


def _raise_terminated(signum: int, frame: Any) -> None:
    _TERMINATED.set()
    raise Terminated


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within: SIGTERM raises Terminated, a KeyboardInterrupt, which `terminated` tells from Ctrl-C's."""
    _TERMINATED.clear()
    with signal_handler(signal.SIGTERM, _raise_terminated):
        yield


def terminated(interrupt: KeyboardInterrupt) -> bool:
    """Whether `interrupt`, within sigterm_interrupts, came of SIGTERM rather than Ctrl-C."""
    return isinstance(interrupt, Terminated) or _TERMINATED.is_set()


@contextlib.contextmanager
def handled_as_before(*signums: int) -> Iterator[None]:
    """Within: code that installs handlers of its own for `signums` (ray.init, Ray Train's fit), which may end
    it their own way (SystemExit, an aborted run's error, or not at all); after: the handlers from before are
    back, and each of `signums` that came within is handed to its handler from before, which raises where it
    does (Python's SIGINT handler: KeyboardInterrupt), in place of how the code ended. That one came is read from
    the signal wakeup fd, which Python writes the number of every signal with a Python handler to, whichever
    handler that is. Only in the main thread, whose handlers they are; elsewhere, nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    try:
        for end in (read_end, write_end):
            os.set_blocking(end, False)
        wakeup_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        failure = None
        try:
            with contextlib.ExitStack() as restored:
                for signum in signums:
                    restored.enter_context(signal_handler(signum))
                yield
        except BaseException as err:
            failure = err
        finally:
            signal.set_wakeup_fd(wakeup_fd)
        received = _signals_received(read_end)
        for signum in signums:
            if signum in received and callable(handler := signal.getsignal(signum)):
                handler(signum, None)
        if failure is not None:
            raise failure
    finally:
        os.close(read_end)
        os.close(write_end)


def _signals_received(wakeup_read_end: int) -> bytes:
    """The numbers of the signals written to the signal wakeup fd whose read end is given."""
    try:
        return os.read(wakeup_read_end, 4096)
    except BlockingIOError:  # nothing written
        return b""
