"""Graceful stop: SIGTERM or a first Ctrl-C lets the current step finish and be checkpointed."""

from __future__ import annotations

import os
import signal
import sys
import threading


class StopRequests:
    """Within `with StopRequests() as stop:`, `stop.requested` names the signal that asked to stop.

    A second SIGINT quits at once (exit 130): the atomic checkpoint writes make that safe.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            print(f"\n{name} again: stopping now without a checkpoint.", file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = name
        print(f"\n{name}: finishing this step, then saving a checkpoint (Ctrl-C again to quit at once).",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequests:
        # Signal handlers can only be set from the main thread (e.g. not inside a notebook's worker).
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
