"""Build the bundled CT-ICH dataset shipped inside the package.

Reads the full-resolution CT-ICH release (650x650 JPEG, brain and bone windows) and writes every
slice downsized to 160x160 grayscale JPEG, with the labels, patient IDs and the CC BY 4.0 credit,
to ``src/ichedge/datasets/ct_ich_160``. 160 px is the largest input size the paper used, so every
paper configuration can be trained from the bundle.

    python scripts/build_bundled_dataset.py [--source ../shared/data/ct-ich]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "ichedge" / "datasets" / "ct_ich_160"
SIZE = 160
QUALITY = 90

CREDIT = """# CT-ICH, downsized to 160x160 (bundled with ichedge)

Every slice of CT-ICH (82 patients, 2,501 slices, brain and bone windows), resized from 650x650
to 160x160 grayscale JPEG (Lanczos, quality {quality}) by `scripts/build_bundled_dataset.py`.
`labels.csv` keeps the original columns (patient, slice, hemorrhage, subtypes, fracture, image
paths); slice 084_036 has no bone-window image in the source and none here.

Source: "Computed Tomography Images for Intracranial Hemorrhage Detection and Segmentation",
version 1.0.0, by Murtadha D. Hssayeni, Muayad S. Croock, Aymen Al-Ani, Hassan Falah Al-khafaji
and Zakaria A. Yahya, published on PhysioNet (doi:10.13026/w8q8-ky94). Data descriptor:
Hssayeni et al., "Intracranial Hemorrhage Segmentation Using a Deep Convolutional Model",
Data 2020, 5(1):14. Licence: Creative Commons Attribution 4.0 International (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/. Changes: images downsized and re-encoded.

Slices of one patient are strongly correlated: split by patient, never by slice.
"""


def build(source: Path, dest: Path) -> int:
    rows = list(csv.DictReader((source / "labels.csv").open(newline="")))
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        out = Path(tmp) / dest.name
        for window in ("brain", "bone"):
            (out / window).mkdir(parents=True)
        for row in rows:
            for window in ("brain", "bone"):
                rel = row[window]
                if not rel:
                    continue
                with Image.open(source / rel) as im:
                    small = im.convert("L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
                small.save(out / rel, quality=QUALITY, optimize=True)
        shutil.copy(source / "labels.csv", out / "labels.csv")
        (out / "README.md").write_text(CREDIT.format(quality=QUALITY))
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    return len(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "ct-ich")
    args = parser.parse_args()
    if not (args.source / "labels.csv").is_file():
        print(f"error: {args.source}/labels.csv not found: pass --source", file=sys.stderr)
        return 2
    DEST.parent.mkdir(parents=True, exist_ok=True)
    n = build(args.source, DEST)
    size = sum(p.stat().st_size for p in DEST.rglob("*") if p.is_file())
    print(f"wrote {n} slices to {DEST} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
