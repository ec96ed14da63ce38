"""The int8 model on the real microcontroller runtime: TensorFlow Lite Micro (tflite-micro).

The tflite-micro Python interpreter can abort the whole process (SIGABRT was seen on an
alpha-0.1 model during an arena search), so every TFLM call runs in a child process and a crash
becomes a :class:`TFLMError` that says what happened.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ARENA_STEP = 1024  # bytes: the search's resolution; MCU linker scripts round up to this anyway


class TFLMError(RuntimeError):
    """TFLM could not load or run the model; the message says why."""


class TFLMCrash(TFLMError):
    """The TFLM child process died on a signal."""


@dataclass
class TFLMRun:
    ok: bool
    outputs: np.ndarray | None
    error: str = ""


def _worker(model: str, arena: int, inputs: str | None, outputs: str | None) -> int:
    """Runs in the child: allocate, optionally invoke on every input, report as JSON."""
    from tflite_micro.python.tflite_micro import runtime

    try:
        it = runtime.Interpreter.from_bytes(Path(model).read_bytes(), arena_size=arena)
        if inputs:
            x = np.load(inputs)
            results = []
            for image in x:
                it.set_input(image[None], 0)
                it.invoke()
                results.append(np.array(it.get_output(0)).reshape(-1))
            np.save(outputs, np.stack(results))
        else:
            it.set_input(np.zeros(it.get_input_details(0)["shape"], np.int8), 0)
            it.invoke()
    except (RuntimeError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 0
    print(json.dumps({"ok": True}))
    return 0


def _unsupported_op(stderr: str) -> str | None:
    m = re.search(r"Didn't find op for builtin opcode '([A-Z0-9_]+)'", stderr)
    return m.group(1) if m else None


def run_tflm(model: Path, arena: int, x: np.ndarray | None = None, timeout: float = 300) -> TFLMRun:
    """Load ``model`` in TFLM with an ``arena``-byte tensor arena, in a child process.

    With ``x`` (int8 inputs), run every image and return the raw int8 outputs. An arena too
    small gives ``ok=False``; a missing operator or a crash raises :class:`TFLMError`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        in_path = out_path = None
        if x is not None:
            in_path, out_path = f"{tmp}/x.npy", f"{tmp}/y.npy"
            np.save(in_path, np.asarray(x, np.int8))
        cmd = [sys.executable, "-c", "import sys; from ichedge.tflm import _worker; "
               "sys.exit(_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4] or None))",
               str(model), str(arena), in_path or "", out_path or ""]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TFLMError(f"{model}: TFLM did not finish within {timeout:.0f} s") from None
        if (op := _unsupported_op(proc.stderr + proc.stdout)) is not None:
            raise TFLMError(f"{model}: TensorFlow Lite Micro has no kernel for operator {op}")
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            tail = proc.stderr.strip().splitlines()[-1:] or [""]
            raise TFLMCrash(f"{model}: TFLM crashed ({name}) with a {arena}-byte arena {tail[0]}".rstrip())
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise TFLMError(f"{model}: TFLM child failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
        report = json.loads(lines[-1])
        outputs = np.load(out_path) if report["ok"] and out_path else None
        return TFLMRun(report["ok"], outputs, report.get("error", ""))


# (model sha256, start, step) -> arena: a search is a dozen child processes, done once per model.
_ARENAS: dict[tuple[str, int | None, int], int] = {}


def find_arena(model: Path, high: int | None = None, step: int = ARENA_STEP) -> int:
    """The smallest tensor arena (to ``step`` bytes) in which TFLM allocates and runs the model.

    Doubles from ``high`` until one works, then bisects. Every probe is a fresh child process.
    """
    key = (hashlib.sha256(Path(model).read_bytes()).hexdigest(), high, step)
    if key not in _ARENAS:
        _ARENAS[key] = _search_arena(model, high, step)
    return _ARENAS[key]


def _search_arena(model: Path, high: int | None, step: int) -> int:
    high = high or max(64 * 1024, Path(model).stat().st_size)
    while not _fits(model, high):
        high *= 2
        if high > 64 * 2**20:
            raise TFLMError(f"{model}: TFLM fails even with a 64 MiB arena")
    low = 0  # known to fail (or untested: an arena of 0 always fails)
    while high - low > step:
        mid = (low + high) // 2 // step * step or step
        if mid <= low:
            break
        if _fits(model, mid):
            high = mid
        else:
            low = mid
    return high


def _fits(model: Path, arena: int) -> bool:
    """Whether the model runs in ``arena`` bytes; a crash while probing counts as too small."""
    try:
        return run_tflm(model, arena).ok
    except TFLMCrash:
        return False
