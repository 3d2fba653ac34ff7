"""
The original failnozzle's main module, kept so that what was written for it
works unchanged:

- C{python -m failnozzle.server [CONFIG]}, the command of its README and of
  every supervisor config written for it, runs the daemon in the foreground
  (C{twistd -n failnozzle}), logging to standard error as the original did;
- configs imported C{UniqueMessage} (to extend the unique fields) and the
  default record of internal errors (to wrap it in their own
  INTERNAL_ERROR_FUNC) from here.

Importing it does nothing else: Twisted's twistd is imported only to run.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from twisted.logger import ILogObserver, textFileLogObserver

from failnozzle.config import UniqueMessage
from failnozzle.ingest import default_internal_error_record

__all__ = ["UniqueMessage", "main"]

#: The original's name for the default INTERNAL_ERROR_FUNC.
_default_fake_record = default_internal_error_record

USAGE = """\
usage: python -m failnozzle.server [CONFIG]

Run failnozzle in the foreground with the settings of the config file
CONFIG (a Python file of UPPER_CASE settings), or with the defaults.  This
is twistd -n --pidfile= failnozzle --config=CONFIG, logging to standard
error; see twistd failnozzle --help for more options."""


def log_to_stderr() -> ILogObserver:
    """The log observer for twistd's C{--logger}: lines on standard error."""
    return textFileLogObserver(sys.stderr)


def twistd_arguments(config: Optional[str]) -> list:
    """The arguments of C{twistd} that run as the original's command did."""
    arguments = ["--nodaemon", "--pidfile=",
                 "--logger=failnozzle.server.log_to_stderr", "failnozzle"]
    if config is not None:
        arguments.append(f"--config={config}")
    return arguments


def main(argv: Optional[Sequence[str]] = None) -> None:
    """
    Run C{python -m failnozzle.server [CONFIG]}: the daemon until it is
    stopped.  A usage error exits with 2, C{--help} with 0, a config that
    cannot be used with 1 (and one line saying why).
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] in (["-h"], ["--help"]):
        print(USAGE)
        raise SystemExit(0)
    if len(arguments) > 1:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    from twisted.scripts.twistd import run

    sys.argv[1:] = twistd_arguments(arguments[0] if arguments else None)
    run()


if __name__ == "__main__":
    main()
