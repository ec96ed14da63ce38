"""Which slice-to-study aggregate to use: every aggregate on the runs of a cross-validated sweep.

Usage: python bench/study_aggregation.py SWEEP_DIR [CONFIG ...]
(e.g. runs/.../20261127-163021-sweep-5fold 160px-a0.35-gray). Patients are the studies. The
choice is made on the validation patients' AUC (never the test folds'); test figures are shown
beside it for the record.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ichedge.evaluation import evaluate_studies
from ichedge.studies import AGGREGATES, study_arrays


def fold_parts(run: Path) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    meta = json.loads((run / "config.json").read_text())
    pred = np.load(run / "predictions.npz")
    return {part: ([key.split("/")[0] for key in meta["split"][part]], pred[f"{part}_y"], pred[f"{part}_p"])
            for part in ("val", "test")}


def study_auc(groups: list[str], y: np.ndarray, p: np.ndarray, method: str) -> float:
    return float(roc_auc_score(*study_arrays(groups, y, p, method)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, metavar="SWEEP_DIR", help="a cross-validated sweep folder")
    ap.add_argument("configs", nargs="*", metavar="CONFIG",
                    help="configurations' run-folder prefixes (default: every one in SWEEP_DIR)")
    args = ap.parse_args(argv)
    sweep = args.sweep
    configs = args.configs or sorted({p.name.rsplit("-fold", 1)[0] for p in sweep.glob("*-fold*")})
    print("| config | aggregate | val AUC (choice) | test AUC | test sensitivity | test specificity |")
    print("|---|---|---|---|---|---|")
    for config in configs:
        folds = [fold_parts(run) for run in sorted(sweep.glob(f"{config}-fold*"))]
        for method in AGGREGATES:
            val = [study_auc(*f["val"], method) for f in folds]
            test = [evaluate_studies(*f["val"], *f["test"], method, 0.95) for f in folds]
            ms = lambda v: f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}"  # noqa: E731
            print(f"| {config} | {method} | {ms(val)} | {ms([t['auc'] for t in test])} | "
                  f"{ms([t['sensitivity'] for t in test])} | {ms([t['specificity'] for t in test])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
