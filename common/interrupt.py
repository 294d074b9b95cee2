"""Ctrl-C at a safe point: a long loop finishes the step it is in, saves, and stops.

Every command ends a Ctrl-C with one line `<command>: interrupted` and exit 130
(common/cli.py, ``run_command``). A loop whose state must stay consistent (the trainer: a step
updates the critics, then the generator) installs ``StopRequest``: the first Ctrl-C (or SIGTERM,
a scheduler's or launcher's polite stop) only asks it to stop at the end of the step, a second one
interrupts at once, except under a launcher that forwards the signal again and kills the process
after its own grace period.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: while active, SIGINT and SIGTERM set ``requested`` instead of raising (a
    second one raises ``KeyboardInterrupt`` as usual, unless ``launched``). Outside the main
    thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, launched: bool = False) -> None:
        self.requested = False
        self.launched = launched
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and not self.launched:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
