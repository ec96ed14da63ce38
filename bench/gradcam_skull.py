"""Do the Grad-CAM heatmaps point inside the skull? Measured on CT-ICH test folds' positive slices.

Usage: python bench/gradcam_skull.py SWEEP_DIR CONFIG [OUT_PNG]
(e.g. runs/.../sweep-5fold 160px-a0.35-gray). The images are those the sweep read (the bundle,
or the manifest given with --data). For each fold's model, the positive slices of its
test patients: the share of heatmap mass inside the skull (from the bone window, same crop)
against the share of the frame the inside of the skull covers (what a heatmap spread evenly
would score). Slices whose skull is not a closed ring (skull base) are counted and left out.
OUT_PNG gets a sample of overlays titled with the hemorrhage types, to look at.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import keras
import numpy as np

from ichedge.data import bundled_path, read_manifest
from ichedge.explain import GradCAM, intracranial_mask, mass_inside, overlay
from ichedge.preprocess import Preprocessing, load_record

TYPES = ("IVH", "IPH", "SAH", "EDH", "SDH")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, metavar="SWEEP_DIR", help="a cross-validated sweep folder")
    ap.add_argument("config", metavar="CONFIG", help="the configuration's run-folder prefix, e.g. 160px-a0.35-gray")
    ap.add_argument("sheet", type=Path, nargs="?", metavar="OUT_PNG", help="where to write a sheet of sample overlays")
    args = ap.parse_args(argv)
    sweep, config, sheet = args.sweep, args.config, args.sheet
    runs = sorted(sweep.glob(f"{config}-fold*"))
    if not runs:
        raise SystemExit(f"{sweep}: no {config}-fold* run folders")
    source = json.loads((runs[0] / "config.json").read_text())["dataset"]["source"]
    manifest = bundled_path() / "labels.csv" if source == "bundled" else Path(source)
    by_key = {r.key: r for r in read_manifest(manifest, ("brain", "bone")).records}
    with manifest.open() as fh:
        types = {f"{row['patient']}/{row['slice']}": [t for t in TYPES if row[t] == "1"] for row in csv.DictReader(fh)}
    inside, area, open_rings, empty, samples = [], [], 0, 0, []
    for run in runs:
        meta = json.loads((run / "config.json").read_text())
        pre = meta["preprocessing"]
        both = Preprocessing(pre["size"], "brain-bone", pre["crop"])  # same crop; plane 1 is the bone window
        keys = [k for k in meta["split"]["test"] if k in by_key and by_key[k].label == 1]
        planes = np.stack([load_record(by_key[k], both) for k in keys])
        x = np.repeat(planes[..., :1], 3, axis=-1)  # the gray model's input: brain window x3
        heat, prob = GradCAM(keras.models.load_model(run / "model.keras"))(x)
        for k, h, b, im, p in zip(keys, heat, planes[..., 1] / 255.0, x, prob):
            mask = intracranial_mask(b)
            if mask.mean() < 0.1:
                open_rings += 1
                continue
            if h.sum() == 0:  # no positive evidence anywhere (a low-probability slice)
                empty += 1
                continue
            inside.append(mass_inside(h, mask))
            area.append(float(mask.mean()))
            if len(samples) < 12 and len(inside) % 7 == 1:
                samples.append((k, types.get(k, []), p, overlay(im, h, 1)))
        print(f"{run.name}: {len(keys)} positive test slices")
    inside, area = np.array(inside), np.array(area)
    print(f"slices measured: {len(inside)}; left out: {open_rings} with no closed skull ring, {empty} with an empty map")
    print(f"heatmap mass inside the skull: mean {inside.mean():.3f}, median {np.median(inside):.3f}")
    print(f"inside-skull share of the frame (even spread): mean {area.mean():.3f}")
    print(f"slices with more mass inside than an even spread: {(inside > area).mean():.3f}")
    if sheet and samples:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, (len(samples) + 1) // 2, figsize=(2.6 * ((len(samples) + 1) // 2), 6.0),
                                 constrained_layout=True)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, (k, t, p, picture) in zip(axes.ravel(), samples):
            ax.imshow(picture)
            ax.set_title(f"{k} {'+'.join(t)} p={p:.2f}", fontsize=8)
        fig.suptitle("Grad-CAM on CT-ICH test slices with hemorrhage (data: CT-ICH, PhysioNet, CC BY 4.0)", fontsize=9)
        fig.savefig(sheet, dpi=100)
        print(f"sample sheet: {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
