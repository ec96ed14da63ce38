"""Does Grad-CAM point at the bleed? The pointing game on the second hospital's masks.

Usage: python bench/gradcam_localisation.py RUN_DIR [RUN_DIR ...] [--data PHE_MANIFEST]

Each RUN_DIR is an `ichedge train` run folder (trained on CT-ICH, so the second hospital,
PHE-SICH-CT-IDS, is unseen). On every PHE slice with a mask, the mask is made solid (convex
hull of the edema outline, which encloses the hematoma; and, for comparison, the outline with
its holes filled, as the source describes it), cropped and resized as the image
(ichedge.localisation.prepared_mask), and the Grad-CAM heatmap of the model is measured
against it (ichedge.localisation.localisation):

- pointing game: the share of slices whose heatmap peak lies in the mask, and within
  --tolerance pixels of it; beside it a peak always at the frame's centre, and chance (the
  mask's share of the frame, and of the frame within the tolerance of the mask);
- heatmap mass in the mask, against the mask's share of the frame (mass ratio 1: an even
  spread), and the share of slices with more mass in the mask than that share;
- the same on the masked slices the model flags at its validated high-sensitivity threshold;
- the model's slice AUC on all PHE slices, for context.

Intervals: 95% percentile bootstrap over patients (1,000 draws). Prints one markdown table,
a column per run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import keras
import numpy as np

from ichedge.data import read_manifest
from ichedge.evaluation import rank_auc
from ichedge.explain import GradCAM
from ichedge.localisation import TOLERANCE, localisation, prepared_mask
from ichedge.preprocess import load_inputs
from ichedge.runs import RunFolder

DEFAULT_PHE = "../shared/data/phe-sich/labels.csv"
CHUNK = 256  # slices loaded and scored at a time, so that 3,478 inputs never sit in memory at once


def cell(summary: dict, key: str) -> str:
    s = summary[key]
    return f"{s['value']:.3f} ({s['low']:.3f}-{s['high']:.3f})"


def measure(run_dir: Path, ds, tolerance: float) -> dict[str, str]:
    """One run's column of the table."""
    start = time.perf_counter()
    run = RunFolder.open(run_dir)
    pre = run.preprocessing
    model = keras.models.load_model(run.model_file)
    threshold = run.metrics()["high_sensitivity"]["threshold"]
    probs = []
    for chunk in np.array_split(np.arange(len(ds)), max(1, len(ds) // CHUNK)):
        loaded = load_inputs(ds, pre, chunk)
        if loaded.errors:
            raise SystemExit(f"unreadable images, e.g. {loaded.errors[0]}")
        probs.append(model.predict(loaded.x, batch_size=64, verbose=0).reshape(-1))
    auc = rank_auc(ds.labels, np.concatenate(probs))
    masked = np.array([i for i, r in enumerate(ds.records) if r.label == 1 and r.mask is not None])
    heat, p = GradCAM(model)(load_inputs(ds, pre, masked).x)
    groups = ds.groups[masked]
    hull = np.stack([prepared_mask(ds.records[i], pre, "hull") for i in masked])
    holes = np.stack([prepared_mask(ds.records[i], pre, "holes") for i in masked])
    res = localisation(heat, hull, groups, tolerance)
    ring = localisation(heat, holes, groups, tolerance)
    flagged = p >= threshold
    hit = localisation(heat[flagged], hull[flagged], groups[flagged], tolerance)
    s, t = res["summary"], f"{tolerance:g} px"
    return {
        "input": f"{pre.size}x{pre.size}, {run.config.get('head', 'paper')} head",
        "PHE slice AUC (all slices)": f"{auc:.3f}",
        "masked slices measured (patients)": f"{res['n_slices']} ({res['n_patients']})",
        "masks empty after the resize (left out)": str(res["skipped_empty_mask"]),
        "heatmaps empty (a miss; no mass)": str(res["empty_heatmaps"]),
        "**pointing game, 0 px**": cell(s, "pointing"),
        f"pointing game, {t}": cell(s, "pointing_tolerance"),
        "peak at the centre, 0 px": cell(s, "centre"),
        f"peak at the centre, {t}": cell(s, "centre_tolerance"),
        "chance: mask's share of the frame": cell(s, "area_share"),
        f"chance: share within {t} of the mask": cell(s, "area_share_tolerance"),
        "heatmap mass in the mask": cell(s, "mass_inside"),
        "**mass ratio** (mass / area share; 1 = even spread)": cell(s, "mass_ratio"),
        "slices with more mass in the mask than its area share": cell(s, "mass_above_area"),
        "flagged at the run's high-sensitivity threshold: slices": f"{hit['n_slices']} (threshold {threshold:.3f})",
        "flagged: pointing game, 0 px": cell(hit["summary"], "pointing") if hit["n_slices"] else "-",
        "flagged: mass ratio": cell(hit["summary"], "mass_ratio") if hit["n_slices"] else "-",
        "outline with holes filled (no hull): pointing game, 0 px": cell(ring["summary"], "pointing"),
        "outline with holes filled: mass ratio": cell(ring["summary"], "mass_ratio"),
        "time (s)": f"{time.perf_counter() - start:.0f}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR", help="ichedge train run folders")
    ap.add_argument("--data", default=DEFAULT_PHE, help=f"PHE-SICH manifest with masks (default: {DEFAULT_PHE})")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help=f"pointing-game tolerance, pixels of the model input (default: {TOLERANCE})")
    args = ap.parse_args(argv)
    ds = read_manifest(args.data)
    print(ds.summary())
    columns = [measure(run, ds, args.tolerance) for run in args.runs]
    print("\n| | " + " | ".join(c["input"] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in list(columns[0])[1:]:
        print(f"| {row} | " + " | ".join(c[row] for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
