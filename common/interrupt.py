"""Ctrl-C at a safe point: a long loop finishes the step it is in, saves, and stops.

Every command ends a Ctrl-C with one line `<command>: interrupted` and exit 130
(common/cli.py, ``run_command``). A loop whose state must stay consistent (the trainer: a step
updates the critics, then the generator) installs ``StopRequest``: the first Ctrl-C only asks it
to stop at the end of the step, a second one interrupts at once.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: while active, SIGINT sets ``requested`` instead of raising (the second
    SIGINT raises ``KeyboardInterrupt`` as usual). Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
