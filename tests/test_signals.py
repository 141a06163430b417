import os
import signal
import sys
from unittest import mock

import pytest

from drift_ray.config import load_config
from drift_ray.pipeline import connect_ray
from drift_ray.signals import handled_as_before


class Stopped(Exception):
    pass


@pytest.fixture
def stop_on_sigterm():
    """A SIGTERM handler that raises, as the drift-ray command's does."""

    def stop(signum, frame):
        raise Stopped

    before = signal.signal(signal.SIGTERM, stop)
    yield stop
    signal.signal(signal.SIGTERM, before)


def start_as_ray_does(*args, **kwargs):
    """What ray.init does with a SIGTERM that comes while it starts: its own handler ends the process."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_while_ray_starts_ends_as_the_handler_before_says(stop_on_sigterm):
    """Before, ray.init's handler ended the command with status 15 and no word."""
    with mock.patch("ray.is_initialized", return_value=False), mock.patch("drift_ray.pipeline._init_ray", start_as_ray_does):
        with pytest.raises(Stopped):
            connect_ray(load_config(None, []))
    assert signal.getsignal(signal.SIGTERM) is stop_on_sigterm
    assert signal.set_wakeup_fd(-1) == -1  # put back too


def test_code_that_no_signal_stopped_ends_as_it_did(stop_on_sigterm):
    def ends(how):
        with handled_as_before(signal.SIGTERM):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a handler of its own, not called
            if how is not None:
                raise how
            return "result"

    assert ends(None) == "result"
    with pytest.raises(SystemExit):
        ends(SystemExit(1))
    assert signal.getsignal(signal.SIGTERM) is stop_on_sigterm
