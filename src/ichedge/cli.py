"""`ichedge` entry point: set up output, then run the command (:mod:`ichedge.commands`).

TensorFlow prints its start-up lines from C++ while it is imported, so whether they show
(``--verbose``) must be known before the commands module, which imports it, is loaded.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ichedge import output


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a job scheduler, a container stop) into SystemExit.

    Python's default SIGTERM ends the process without unwinding, so the cleanup of a
    half-written run or export folder never ran and a hidden temporary folder stayed behind.
    """
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--verbose", action="store_true")
    verbose = early.parse_known_args(argv)[0].verbose
    output.configure(verbose)
    exit_cleanly_on_sigterm()
    with output.native_output_silenced():
        from ichedge import commands  # noqa: PLC0415 (loads TensorFlow: after output is configured)

    return commands.run(argv)


if __name__ == "__main__":
    sys.exit(main())
