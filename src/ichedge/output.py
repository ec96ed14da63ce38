"""What a command prints: its own summary, not the frameworks' start-up and converter chatter.

TensorFlow, absl, oneDNN and the LiteRT converter write from C++ straight to the process's
file descriptors, so Python's logging cannot hold them back. :func:`configure` sets the quiet
default (or ``verbose``) once per process; :func:`native_output_silenced` wraps the places
that chatter (importing TensorFlow, converting a model). Progress bars are drawn only on a
terminal (:func:`progress_wanted`), never into a log file or CI output.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"verbose": False}


def configure(verbose: bool = False) -> None:
    """Quiet by default: framework loggers at ERROR, their warnings off; ``verbose`` shows everything."""
    _state["verbose"] = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if verbose:
        return
    for name in ("tensorflow", "absl", "keras", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("keras", "tensorflow", "absl", "ai_edge_litert"):
        warnings.filterwarnings("ignore", module=module)


@contextmanager
def native_output_silenced() -> Iterator[None]:
    """Send what C++ code writes to stdout and stderr to /dev/null for the block (unless verbose).

    Python's own streams are flushed first, so nothing the command printed itself is lost.
    """
    if _state["verbose"]:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def progress_wanted(quiet: bool = False) -> bool:
    """Progress bars only when asked and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()
