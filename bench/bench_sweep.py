"""Time the paper's sweep on this machine (a benchmark, not a test).

Runs the five paper configurations on one patient-level split of the bundled CT-ICH, exactly as
`ichedge sweep` does, and prints per configuration how long each phase took: feature caching and
head training (the frozen-backbone phase), fine-tuning or from-scratch training, and the whole
configuration end to end (image loading included). Aims on 2 cores: frozen phase under 1 minute
for any configuration; all five, end to end, within 30 minutes.

    python bench/bench_sweep.py [--runs DIR] [--fine-tune-epochs N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ichedge.data import load_bundled
from ichedge.sweep import PAPER_GRID, run_sweep
from ichedge.training import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=None, help="where the sweep folder goes (default: a temp dir)")
    parser.add_argument("--fine-tune-epochs", type=int, default=TrainConfig.fine_tune_epochs,
                        help="fine-tuning epochs of each configuration (default: %(default)s, as ichedge)")
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args(argv)

    runs = args.runs or Path(tempfile.mkdtemp(prefix="ichedge-bench-"))
    base = TrainConfig(fine_tune_epochs=args.fine_tune_epochs)
    ds = load_bundled(base.preprocessing.windows)
    start = time.perf_counter()
    out, results = run_sweep(base, ds, PAPER_GRID, folds=1, runs_root=runs, progress=False)
    total = time.perf_counter() - start

    rows = []
    print(f"cores: {os.cpu_count()}  sweep folder: {out}")
    print(f"{'config':>14} {'weights':>26} {'frozen phase s':>15} {'train s':>8} {'end-to-end s':>13} {'AUC':>6}")
    for r in results:
        s = r.phase_seconds[0]
        frozen = s.get("features", 0) + s.get("frozen", 0)
        trained = s.get("fine_tune", 0) + s.get("from_scratch", 0)
        auc = r.folds[0]["default"]["auc"]
        name = f"{r.config.size}/{r.config.alpha:g}"
        print(f"{name:>14} {r.weights:>26} {frozen:>15.1f} {trained:>8.1f} {r.seconds:>13.1f} {auc:>6.3f}")
        rows.append({"config": name, "weights": r.weights, "frozen_phase_s": frozen, "training_s": trained,
                     "end_to_end_s": r.seconds, "auc": auc})
    print(f"total, five configurations, one split: {total:.0f} s ({total / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps({"total_s": total, "configs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
