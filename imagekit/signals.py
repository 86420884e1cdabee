"""Signals as CI systems send them: SIGTERM and SIGHUP get exactly the clean-up of Ctrl-C.

``install()`` (called once by the CLI, in the main thread) makes SIGINT, SIGTERM and
SIGHUP raise :class:`Interrupted` in the main thread. ``Interrupted`` is a
``KeyboardInterrupt``, so every ``finally`` and ``except KeyboardInterrupt`` that
undoes work for Ctrl-C (stopping child process groups, unmounting, detaching loop
devices, deleting partial outputs and incomplete Glance images) runs for the other
signals too. It is raised **once**: a further signal while that clean-up runs is
logged and otherwise ignored, so an impatient second signal (a CI runner's
"terminate, then terminate again") cannot abort the clean-up halfway. Only
SIGKILL ends imagekit without clean-up; what it leaves is found by the next run
(``imagekit.workdir.reap_stale``).

The process exits with 128 + the signal number: 130 (SIGINT), 143 (SIGTERM),
129 (SIGHUP) — ``exit_code_of(exc)``.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("imagekit.signals")

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """imagekit was asked to stop by a signal; ``exit_code`` is 128 + ``signum``."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {signal_name(self.signum)}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum: int, frame: FrameType | None) -> None:
    if _received:
        log.warning("%s received while cleaning up after %s: ignored, the clean-up goes on",
                    signal_name(signum), signal_name(_received[0]))
        return
    _received.append(signum)
    log.info("%s received: stopping and cleaning up", signal_name(signum))
    raise Interrupted(signum)


def install() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (once) in the main thread.

    A signal ignored when imagekit started (``nohup`` ignores SIGHUP) stays ignored.
    Does nothing outside the main thread (Python only runs handlers there).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in HANDLED:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        signal.signal(signum, _handler)


def received() -> int | None:
    """The signal that interrupted this process, or None."""
    return _received[0] if _received else None


def reset() -> None:
    """Forget a received signal (tests running several commands in one process)."""
    _received.clear()


def exit_code_of(exc: BaseException) -> int:
    """The exit code for an interruption: 128 + the signal (130 for a plain Ctrl-C).

    Looks through ``__cause__``/``__context__`` (click wraps a KeyboardInterrupt in ``Abort``).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, Interrupted):
            return cur.exit_code
        cur = cur.__cause__ or cur.__context__
    signum = received()
    return 128 + (signum if signum is not None else signal.SIGINT)
