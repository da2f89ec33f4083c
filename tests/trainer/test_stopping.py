"""The first Ctrl-C / SIGTERM becomes a request; a second one, or one outside, acts as before."""

import os
import signal

import pytest

from bilevel.trainer.stopping import StopRequested, stop_requests


@pytest.fixture(autouse=True)
def interactive_sigint():
    """Ctrl-C as in a terminal, even when the suite runs as a background job (whose SIGINT is
    ignored, and stays ignored by design)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_first_signal_is_a_request_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_requests() as request:
        assert request.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.signal == "SIGTERM"
        # the request restored the previous handlers: a second signal would act at once
        assert signal.getsignal(signal.SIGTERM) is before[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_second_ctrl_c_interrupts_at_once():
    with stop_requests() as request:
        os.kill(os.getpid(), signal.SIGINT)
        assert request.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_an_ignored_signal_stays_ignored_and_disabled_installs_nothing():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_requests():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    handler = signal.getsignal(signal.SIGTERM)
    with stop_requests(enabled=False) as request:
        assert signal.getsignal(signal.SIGTERM) is handler and request.signal is None


def test_the_stop_says_where_to_resume_and_exits_like_a_signal():
    stopped = StopRequested("SIGTERM", 40, "runs/x")
    assert isinstance(stopped, KeyboardInterrupt) and stopped.exit_code == 143
    assert str(stopped) == "stopped by SIGTERM at step 40; checkpoint saved; continue with: " + (
        "bilevel-run resume=runs/x"
    )
    assert StopRequested("SIGINT", 1, None).exit_code == 130
