"""
The state file: what the aggregator has counted, written atomically every
SNAPSHOT_SECONDS so a crash loses at most that much, and read back at start.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from failnozzle.spool import fsync_directory

_log = Logger()

FORMAT_VERSION = 1


class StateFile:
    """
    A JSON file replaced atomically (written beside it, fsynced, renamed),
    so a reader finds the old state or the new one, never half of either.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = os.path.abspath(path)
        self._clock = clock

    def save(self, state: dict) -> None:
        """
        @raise OSError: the file could not be written.
        """
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            json.dump(dict(state, version=FORMAT_VERSION), out,
                      separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)
        fsync_directory(os.path.dirname(self.path))

    def load(self) -> Optional[dict]:
        """
        The saved state; None if there is none or it is unreadable, in
        which case the file is moved aside (never deleted) and the reason
        logged.
        """
        try:
            with open(self.path, encoding="utf-8") as saved:
                state = json.load(saved)
            if state.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format {state.get('version')!r}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError) as error:
            self.set_aside(error)
            return None
        return state

    def set_aside(self, error: Exception) -> None:
        """Move an unusable state file out of the way, saying why."""
        aside = f"{self.path}.bad-{int(self._clock.seconds())}"
        try:
            os.replace(self.path, aside)
        except OSError as move_error:
            aside = f"nowhere ({move_error.strerror})"
        _log.error("STATE_FILE {path} is unusable ({error}); moved to "
                   "{aside}, starting with an empty buffer",
                   path=self.path, error=error, aside=aside)
