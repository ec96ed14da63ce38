"""How many of a second hospital's patients `ichedge calibrate` needs to recover slice sensitivity
>= 0.90 there, and how often the lower bound it promises holds.

A model trained on CT-ICH moves to PHE-SICH-CT-IDS (119 patients, every one with a bleed; 3,478
slices, 676 with a bleed). Its scores are computed once, by the runtime a site would run (the
int8 export by default). For each n, 20 seeded draws of n PHE patients play the site's local
sample: `ichedge.acceptance.calibrate` (sensitivity 0.90, one-sided 95 % bound) chooses the slice
threshold on them, or refuses, and the threshold is measured on the slices of the remaining PHE
patients. Beside it: the shipped thresholds (validated on CT-ICH) and the naive choice, the
highest threshold whose point sensitivity on the n patients reaches 0.90 (no bound, never
refused). The study level is not measured: with no patient free of a bleed it has no
specificity, and the remaining patients are too few for a study sensitivity to say much.

Usage: python bench/site_calibration.py RUN [--data PHE_LABELS] [--backend int8|float32|keras]
RUN is a run folder trained on CT-ICH and exported, e.g. `ichedge train --data CT_ICH --size 160
--alpha 0.35`, then `ichedge export RUN`. PHE-SICH-CT-IDS is for non-commercial use: it is read
from where it lies, never copied.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ichedge.acceptance import BACKENDS, InsufficientSample, calibrate, calibration_model
from ichedge.data import read_dataset
from ichedge.evaluation import binary_metrics, threshold_for_sensitivity
from ichedge.preprocess import load_inputs, patient_groups
from ichedge.runtimes import Predictor

DEFAULT_DATA = "../shared/data/phe-sich/labels.csv"
TARGET, CONFIDENCE = 0.90, 0.95


def measured(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    """Slice sensitivity and specificity at ``threshold``."""
    m = binary_metrics(y, p, threshold)
    return m["sensitivity"], m["specificity"]


def cells(results: list[tuple[float, float]]) -> list[str]:
    """Sensitivity mean / 5th percentile, how often it reached the target, mean specificity."""
    if not results:
        return ["—", "—", "—"]
    sens, spec = np.array(results).T
    return [f"{sens.mean():.3f} / {np.percentile(sens, 5):.3f}", f"{np.mean(sens >= TARGET):.0%}", f"{spec.mean():.3f}"]


def draw_results(y: np.ndarray, p: np.ndarray, groups: np.ndarray, n: int, draws: int, aggregate: str,
                 shipped: float) -> dict:
    """Each draw's figures on the patients left out of its local sample of ``n``."""
    patients = np.unique(groups)
    out: dict = {"calibrated": [], "naive": [], "shipped": [], "refused": 0, "bound": []}
    for draw in range(draws):
        local = np.isin(groups, np.random.default_rng([n, draw]).choice(patients, n, replace=False))
        rest = ~local
        out["shipped"].append(measured(y[rest], p[rest], shipped))
        out["naive"].append(measured(y[rest], p[rest], threshold_for_sensitivity(y[local], p[local], TARGET)))
        try:
            cal = calibrate(y[local], p[local], groups[local], aggregate, TARGET, CONFIDENCE, seed=draw)
        except InsufficientSample:
            out["refused"] += 1
            continue
        out["calibrated"].append(measured(y[rest], p[rest], cal.slice.threshold))
        out["bound"].append(cal.slice.lower_bound)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, metavar="RUN", help="an exported run folder trained on CT-ICH")
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"the second hospital's labels.csv (default: {DEFAULT_DATA})")
    ap.add_argument("--backend", choices=BACKENDS, help="runtime to score with (default: int8 if exported)")
    ap.add_argument("--sizes", default="10,20,30,40,60", help="local sample sizes, in patients")
    ap.add_argument("--draws", type=int, default=20, help="seeded draws per size")
    args = ap.parse_args(argv)

    run, file = calibration_model(args.run, args.backend)
    predictor = Predictor.load(file)
    decision = predictor.decision
    ds = read_dataset(args.data, predictor.preprocessing.windows)
    print(ds.summary())
    inputs = load_inputs(ds, predictor.preprocessing)
    start = time.perf_counter()
    p = predictor.predict(inputs.x)
    y, groups = inputs.y, patient_groups(ds, inputs)
    whole = binary_metrics(y, p, decision.slice_threshold)
    print(f"{run.path.name}: {file.name} ({predictor.runtime}) scored {len(p)} slices in "
          f"{time.perf_counter() - start:.0f} s; slice AUC {whole['auc']:.3f}; shipped slice threshold "
          f"{decision.slice_threshold:.4f} (sensitivity {whole['sensitivity']:.3f}, specificity "
          f"{whole['specificity']:.3f} on all {len(np.unique(groups))} patients)")
    print(f"\nslice sensitivity and specificity on the PHE patients outside each local sample; target "
          f"{TARGET:g}, one-sided {CONFIDENCE:.0%} bound; {args.draws} draws per size\n")
    print("| local patients | calibrate refused | calibrated: sensitivity mean / 5th pct | >= 0.90 | specificity "
          "| mean promised bound | naive (point >= 0.90): sensitivity mean / 5th pct | >= 0.90 | specificity "
          "| shipped: sensitivity mean / 5th pct | >= 0.90 | specificity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        r = draw_results(y, p, groups, n, args.draws, decision.study_aggregate, decision.slice_threshold)
        bound = f"{np.mean(r['bound']):.3f}" if r["bound"] else "—"
        print(f"| {n} | {r['refused']}/{args.draws} | " + " | ".join(cells(r["calibrated"])) + f" | {bound} | "
              + " | ".join(cells(r["naive"]) + cells(r["shipped"])) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
