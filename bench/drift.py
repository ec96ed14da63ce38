"""Does the monitor's drift warning fire on a shift, and stay quiet without one?

Usage: python bench/drift.py RUN_DIR [--runtime int8|keras]
Scores the run's own test patients (unseen in training and validation) as `ichedge predict`
does, unchanged and under simulated acquisition shifts (brighter, a wider or narrower window,
a gamma curve), each batch recorded in its own throwaway store, and prints what
`ichedge monitor` says: PSI of the slice scores against the run's validation scores, flag
and OOD rates, and the warning. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ichedge.data import read_dataset
from ichedge.intake import Source, prepare_sources
from ichedge.monitoring import DRIFT_WARNING, monitor
from ichedge.runs import RunFolder, validation_scores
from ichedge.runtimes import Predictor
from ichedge.store import Store
from ichedge.triage import record_batch, triage

SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "unchanged": lambda a: a,
    **{f"brighter (+{d} of 255)": (lambda d: lambda a: a + d)(d) for d in (5, 10, 15, 20, 25)},
    **{f"darker (-{d} of 255)": (lambda d: lambda a: a - d)(d) for d in (10, 25)},
    **{f"{'narrower' if c > 1 else 'wider'} window (contrast x{c})": (lambda c: lambda a: 128 + (a - 128) * c)(c)
       for c in (0.7, 0.8, 0.85, 1.2, 1.4)},
    **{f"gamma {g}": (lambda g: lambda a: 255 * (np.clip(a, 0, 255) / 255) ** g)(g) for g in (0.8, 1.25)},
}


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, metavar="RUN_DIR", help="a trained (and, for int8, exported) run folder")
    ap.add_argument("--runtime", choices=("int8", "keras"), default="int8")
    args = ap.parse_args(argv)

    run = RunFolder.open(args.run)
    model = run.latest_export().model_file("int8") if args.runtime == "int8" else run.path
    predictor = Predictor.load(model)
    info = run.meta["dataset"]
    ds = read_dataset(info["source"], ("brain",))
    test = set(run.split_keys("test"))
    records = [r for r in ds.records if r.key in test]
    raw = [(f"{r.patient}/{r.slice:03d}.png", np.asarray(Image.open(r.images["brain"]).convert("L"), np.float32))
           for r in records]
    print(f"{args.run.name}: {len(records)} test slices of {len({r.patient for r in records})} unseen patients, "
          f"{args.runtime}; reference: {len(validation_scores(model) or [])} validation slice scores of the same model")
    print(f"| batch | slices scored | PSI | drift warning (> {DRIFT_WARNING}) | flagged slices | OOD slices | "
          "other warnings |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, shift) in enumerate(SHIFTS.items()):
            started = time.perf_counter()
            sources = [Source(n, png(shift(a))) for n, a in raw]
            prepared = prepare_sources(sources, predictor.preprocessing)
            result = triage(prepared, predictor)
            store = Store(Path(tmp) / f"{k}.db")
            record_batch(store, predictor, result, {s.name: s.digest for s in sources}, n_files=len(sources),
                         latency_ms=1000 * (time.perf_counter() - started))
            report = monitor(store)
            (week,) = report["weeks"]
            others = [("input check refusals" if "refused" in w else "outside validated inputs")
                      for w in report["warnings"] if "PSI" not in w]
            value = "-" if week["psi"] is None else f"{week['psi']:.3f}"
            rates = [f"{100 * week[k]:.1f}%" if week[k] is not None else "-" for k in ("flag_rate_slices", "ood_rate")]
            print(f"| {name} | {week['slices']} ({len(prepared.errors)} refused) | {value} | "
                  f"{'yes' if week['drift'] else 'no'} | {rates[0]} | {rates[1]} | {'; '.join(others) or '-'} |")
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
