"""Graceful stop: the first SIGTERM/Ctrl-C asks the loop to finish its step and checkpoint; a second aborts."""

from __future__ import annotations

import signal
import sys
import threading

from tuneloop.errors import TuneloopError


class Interrupted(TuneloopError):
    """Training stopped on a signal after writing a checkpoint."""

    exit_code = 75  # EX_TEMPFAIL: try again (with --resume)


class StopRequest:
    def __init__(self, announce: bool = True):
        self.signal_name: str | None = None
        self.announce = announce
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: stop now, no checkpoint
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.announce:
            print(f"\ntuneloop: {self.signal_name} received: finishing the current step and saving a checkpoint "
                  f"(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
