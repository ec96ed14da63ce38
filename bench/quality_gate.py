"""The input quality gate and the OOD score (ichedge.quality), measured on real slices and junk.

An image that is not a usable head-CT slice must never be scored as negative. Each input goes
through the gate (hard rules on the raw window images and HU); what passes is prepared as the
model would get it (gray, head crop) and scored by an InputReference fitted on the prepared
inputs of CT-ICH training patients (patient split seed 0, as `ichedge train`).

Protocol: PHE-SICH patients are split once (seed 0) into a development half and a test half.
The boundary margin that ships (ichedge.quality's default) was chosen on CT-ICH training
patients (out of fold by patient) and the PHE development half only, never on junk: the "dev
rule" table says which margin that rule picks per input size (the smallest of a grid at which
both pass at least 99%). The features and gate rules were designed with the junk of --seed 0
and 1 in view (and the fixed photos, maps and DICOM files); the default --seed 2 draws fresh
noise, crops, turns, mosaics and charts for the record.

Printed as markdown, per input size (96, 160, 224) and class: items, share refused by the
gate, share flagged by the OOD score (of all items), share passed (of all, and of those the
gate let through), the median and 99th-percentile score of the gated-in items and the gate's
reasons; then the junk items that were scored as usable. PHE-SICH is read from its folder,
never copied (non-commercial licence). About 9 minutes on 2 shared cores.

    python bench/quality_gate.py [--ct-ich CT_ICH] [--phe PHE_SICH] [--sizes 96 160 224] [--seed 2]
"""

from __future__ import annotations

import argparse
import collections
import io
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pydicom
import pydicom.data
import sklearn.datasets
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ichedge.data import DataError, load_bundled, read_dataset, read_image, train_val_test_split
from ichedge.dicom import read_ct_slice, windowed
from ichedge.preprocess import Preprocessing, head_box, prepare_slice, record_windows
from ichedge.quality import N_FEATURES, InputReference, check_slice, held_out_distances, input_features

matplotlib.use("Agg")
import matplotlib.cbook as cbook  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

CT_ICH = "../shared/data/ct-ich/labels.csv"
PHE_SICH = "../shared/data/phe-sich/labels.csv"
MARGINS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
TARGET = 0.99
HEAD_CT = "head CT, other source (pydicom 693_J2KI.dcm)"


@dataclass
class Item:
    """One input as the service would get it: window images (float [0, 1]) and HU for DICOM."""

    name: str
    windows: dict[str, np.ndarray]
    hu: np.ndarray | None = None
    unreadable: str | None = None  # why reading it failed: refused before the gate


@dataclass
class Measured:
    """The gate's verdict on each item of a class, and the features of those it let through."""

    reasons: list[str | None]
    features: dict[int, np.ndarray]  # input size -> (passed, F)
    groups: np.ndarray  # patient of each passed item ("" for junk)
    names: list[str]  # of each passed item


def measure(items: Iterator[tuple[Item, str]], sizes: tuple[int, ...]) -> Measured:
    reasons, feats, groups, names = [], {s: [] for s in sizes}, [], []
    for item, group in items:
        why = item.unreadable or check_slice(item.windows, item.hu)
        reasons.append(why)
        if why is not None:
            continue
        t, l, b, r = head_box(item.windows["brain"])  # crop once; prepare_slice(crop=False) resizes per size
        cropped = {k: v[t:b, l:r] for k, v in item.windows.items()}
        for s in sizes:
            feats[s].append(input_features(prepare_slice(cropped, Preprocessing(size=s, crop=False))[None])[0])
        groups.append(group)
        names.append(item.name)
    return Measured(reasons, {s: np.array(v, np.float64).reshape(len(v), N_FEATURES) for s, v in feats.items()},
                    np.array(groups), names)


# --- real slices ----------------------------------------------------------------------------------


def records(ds, indices, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[Item, str]]:
    for i in indices:
        r = ds.records[i]
        brain = record_windows(r, ("brain",))["brain"]
        yield Item(str(r.path), {"brain": transform(brain) if transform else brain}), str(r.patient)


def turned(rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: ndimage.rotate(a, rng.uniform(0, 360), order=1, reshape=True)


def other_window(a: np.ndarray) -> np.ndarray:
    """CT-ICH's brain window is level 40, width 80 (0..80 HU): shown at level 50, width 60 instead."""
    return np.clip((a * 80 - 20) / 60, 0, 1)


def jpeg(a: np.ndarray, quality: int = 30) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf), np.float32) / 255


def bundled_copy(ds, indices) -> tuple:
    """The same slices in the 160x160 JPEG copy bundled with ichedge."""
    bundled = load_bundled()
    wanted = {(ds.records[i].patient, ds.records[i].slice) for i in indices}
    return bundled, [i for i, r in enumerate(bundled.records) if (r.patient, r.slice) in wanted]


def phe_halves(phe, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the PHE development and test patients (half each, seeded, as bench/site_robustness.py)."""
    patients = np.random.default_rng(seed).permutation(sorted(set(phe.groups)))
    dev = np.isin(phe.groups, patients[: len(patients) // 2])
    return np.flatnonzero(dev), np.flatnonzero(~dev)


# --- junk -----------------------------------------------------------------------------------------


def image_item(name: str, a: np.ndarray) -> Item:
    """A picture as read_image would give it: gray, [0, 1]."""
    a = np.asarray(a, np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=-1)
    lo, hi = float(a.min()), float(a.max())
    return Item(name, {"brain": (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)})


def through_png(name: str, a: np.ndarray) -> Item:
    """Saved as an 8-bit PNG and read back as the service would."""
    buf = io.BytesIO()
    Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return Item(name, {"brain": read_image(Path(name), buf.getvalue())})


def blank() -> list[Item]:
    # 4096x4096 stands in for the 9000x9000 PNG (the rules do not depend on size; memory stays bounded)
    return [Item(f"blank {v} {n}x{n}", {"brain": np.full((n, n), v, np.float32)})
            for v in (0.0, 0.5, 1.0) for n in (64, 512, 4096)]


def odd_shapes(rng: np.random.Generator) -> list[Item]:
    shapes = [(1, 1), (1, 5000), (5000, 1), (32, 32), (63, 63), (100, 400), (512, 1100), (64, 129)]
    return [Item(f"{w}x{h}", {"brain": rng.random((h, w), dtype=np.float32)}) for h, w in shapes]


def write_dicom(path: Path, stored: np.ndarray, slope: float, intercept: float) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def head_phantom(size: int = 256) -> np.ndarray:
    """Stored values of a head (air, skull, brain) at slope 1, intercept -1024."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < size * 0.35] = 1000.0
    hu[r < size * 0.30] = 35.0
    return np.round(hu + 1024).astype(np.int16)


def bad_dicoms(folder: Path) -> list[Item]:
    """A head phantom whose header makes nonsense of its HU: what the security review sent."""
    items = []
    for slope, intercept in [(float("nan"), -1024), (1e308, -1024), (-1e308, -1024), (float("inf"), -1024),
                             (1.0, float("nan")), (1e6, -1024), (1e-9, -1024), (1.0, 1e9), (1.0, -50000)]:
        path = write_dicom(folder / f"slope{slope}-intercept{intercept}.dcm", head_phantom(), slope, intercept)
        try:
            hu = read_ct_slice(path).hu
        except DataError:
            items.append(Item(path.name, {}, unreadable="unreadable DICOM"))
            continue
        items.append(Item(path.name, windowed(hu, ("brain",)), hu))
    return items


def noise(kind: str, rng: np.random.Generator) -> list[Item]:
    items = []
    for n in (64, 256, 512, 1024):
        for k in range(10):
            if kind == "uniform":
                a = rng.random((n, n), dtype=np.float32)
            else:
                mean, sd = [(0.5, 0.15), (0.5, 0.3), (0.3, 0.1), (0.2, 0.2), (0.45, 0.05)][k % 5]
                a = np.clip(rng.normal(mean, sd, (n, n)), 0, 1).astype(np.float32)
            items.append(Item(f"{kind} {n} #{k}", {"brain": a}))
    return items


def photo_arrays() -> dict[str, np.ndarray]:
    sample = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).parent
    images = {f: np.asarray(Image.open(sample / f).convert("L"), np.float32) / 255
              for f in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")}
    for f in ("china.jpg", "flower.jpg"):
        images[f] = np.asarray(Image.open(Path(sklearn.datasets.__file__).parent / "images" / f).convert("L"),
                               np.float32) / 255
    return images


def variants(name: str, a: np.ndarray) -> list[Item]:
    """The picture, a centre square, a quarter turn and the negative: different ways to send it."""
    h, w = a.shape
    s = min(h, w)
    square = a[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    return [image_item(name, a), image_item(f"{name} square", square), image_item(f"{name} turned", np.rot90(a)),
            image_item(f"{name} negative", 1 - a)]


def photos() -> list[Item]:
    return [v for name, a in photo_arrays().items() for v in variants(name, a)]


def maps() -> list[Item]:
    dem = np.load(cbook.get_sample_data("jacksboro_fault_dem.npz", asfileobj=False))["elevation"]
    topo = np.load(cbook.get_sample_data("topobathy.npz", asfileobj=False))["topo"]
    return [*variants("jacksboro_fault_dem (elevation)", dem), *variants("topobathy (elevation)", topo)]


def head_mr() -> list[Item]:
    """matplotlib's s1045.ima: a sagittal head MR, 256x256 16-bit."""
    with cbook.get_sample_data("s1045.ima.gz") as fh:
        a = np.frombuffer(fh.read(), np.uint16).reshape(256, 256).astype(np.float32)
    return variants("s1045.ima (sagittal head MR)", a)


def pydicom_files() -> dict[str, list[Item]]:
    """pydicom's own test files (local ones only): CT through HU, the rest as exported pictures."""
    folder = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
    ct = {"CT_small.dcm": "chest CT, thoracic vertebra (128x128)",
          "693_J2KI.dcm": "head CT, JPEG 2000 with a bit-depth mismatch (512x512)"}
    other = {"MR_small.dcm": "MR slice (64x64)",
             "examples_overlay.dcm": "abdominal MR, liver (300x484)",
             "liver_1frame.dcm": "liver segmentation mask, SEG (512x512)",
             "examples_rgb_color.dcm": "ultrasound, lymph node (240x320 RGB)",
             "examples_ybr_color.dcm": "ultrasound, heart, first frame (240x320)",
             "examples_palette.dcm": "ultrasound, palette colour (350x800)",
             "image_dfl.dcm": "test pattern, OT (512x512)",
             "JPEG2000.dcm": "nuclear medicine whole-body bone scan (1024x256)",
             "rtdose_1frame.dcm": "RT dose grid (10x10)"}
    out = collections.defaultdict(list)
    for f, what in ct.items():
        hu = read_ct_slice(folder / f).hu
        out[HEAD_CT if f.startswith("693") else "chest CT (DICOM, HU)"].append(
            Item(f"{f}: {what}", windowed(hu, ("brain",)), hu))
    for f, what in other.items():
        a = pydicom.dcmread(folder / f).pixel_array.astype(np.float32)
        a = a[0] if a.ndim == 4 or (a.ndim == 3 and a.shape[-1] != 3) else a
        out["MR, ultrasound, other DICOM (as pictures)"].append(image_item(f"{f}: {what}", a))
    out["MR, ultrasound, other DICOM (as pictures)"] += head_mr()
    return out


def crops(ds, indices: np.ndarray, rng: np.random.Generator) -> dict[str, list[Item]]:
    """Quadrants, halves, turned quadrants and 2x2 mosaics of CT-ICH test slices."""
    chosen = rng.choice(indices, 30, replace=False)
    out = collections.defaultdict(list)
    for i in chosen:
        a = record_windows(ds.records[i], ("brain",))["brain"]
        h, w = a.shape
        name = ds.records[i].path.name
        quads = [a[:h // 2, :w // 2], a[:h // 2, w // 2:], a[h // 2:, :w // 2], a[h // 2:, w // 2:]]
        out["quadrant crops"] += [Item(f"{name} q{k}", {"brain": q}) for k, q in enumerate(quads)]
        out["quadrant crops, turned (any angle)"] += [
            Item(f"{name} q{k} turned", {"brain": ndimage.rotate(q, rng.uniform(0, 360), order=1)})
            for k, q in enumerate(quads)]
        halves = [a[:h // 2], a[h // 2:], a[:, :w // 2], a[:, w // 2:]]
        out["half crops"] += [Item(f"{name} h{k}", {"brain": q}) for k, q in enumerate(halves)]
    patients = ds.groups[indices]
    for k in range(40):
        if k % 2:  # four slices in a row of one patient, as a viewer's 2x2 layout shows them
            p = indices[patients == rng.choice(patients)]
            start = rng.integers(0, max(len(p) - 3, 1))
            four = p[start:start + 4] if len(p) >= 4 else rng.choice(p, 4)
        else:
            four = rng.choice(indices, 4, replace=False)
        tiles = [np.asarray(Image.fromarray(record_windows(ds.records[i], ("brain",))["brain"], mode="F")
                            .resize((325, 325), Image.Resampling.BILINEAR)) for i in four]
        mosaic = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
        out["2x2 mosaics of slices"].append(through_png(f"mosaic {k}", mosaic))
    return out


def charts(rng: np.random.Generator) -> list[Item]:
    items = []
    for style in ("default", "dark_background", "grayscale"):
        for kind in ("line", "bar", "scatter", "pie", "hist", "heatmap"):
            with plt.style.context(style):
                fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
                if kind == "line":
                    ax.plot(np.cumsum(rng.normal(size=(200, 3)), axis=0))
                elif kind == "bar":
                    ax.bar(range(8), rng.random(8))
                elif kind == "scatter":
                    ax.scatter(*rng.normal(size=(2, 300)), s=8)
                elif kind == "pie":
                    ax.pie(rng.random(5) + 0.2)
                elif kind == "hist":
                    ax.hist(rng.normal(size=1000), bins=30)
                else:
                    ax.imshow(rng.random((12, 12)), cmap="gray")
                ax.set_title(f"{kind} chart")
                fig.canvas.draw()
                a = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255
                plt.close(fig)
            items.append(image_item(f"{kind} chart ({style})", a))
    return items


def text() -> list[Item]:
    words = ("Patient referred for head CT. No acute intracranial hemorrhage. Ventricles normal in size. "
             "Impression: unremarkable study; clinical correlation advised.").split()
    items = []
    for size in (14, 28, 56):
        for dark in (False, True):
            im = Image.new("L", (512, 512), 0 if dark else 255)
            draw, font = ImageDraw.Draw(im), ImageFont.load_default(size=size)
            line, y = "", 10
            for word in words * 6:
                if draw.textlength(f"{line} {word}", font=font) > 490:
                    draw.text((10, y), line, fill=255 if dark else 0, font=font)
                    line, y = word, y + int(size * 1.3)
                else:
                    line = f"{line} {word}".strip()
                if y > 512 - size:
                    break
            items.append(through_png(f"text {size}px {'white on black' if dark else 'black on white'}",
                                     np.asarray(im, np.float32) / 255))
    return items


# --- the table ------------------------------------------------------------------------------------


def row(name: str, m: Measured, scores: np.ndarray) -> str:
    n = len(m.reasons)
    refused = sum(r is not None for r in m.reasons)
    flagged = int((scores >= 1).sum())
    reasons = collections.Counter(r.split(" (")[0] if r.startswith(("too small", "not slice", "implausible")) else r
                                  for r in m.reasons if r is not None)
    why = "; ".join(f"{k} {v}" for k, v in reasons.most_common()) or "-"
    pct = lambda k: f"{100 * k / n:.1f}%"  # noqa: E731
    spread = f"{np.median(scores):.2f} / {np.quantile(scores, 0.99):.2f}" if len(scores) else "-"
    gated_in = f"{100 * np.mean(scores < 1):.1f}%" if len(scores) else "-"
    return (f"| {name} | {n} | {pct(refused)} | {pct(flagged)} | {pct(n - refused - flagged)} | {gated_in} | {spread} "
            f"| {why} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct-ich", default=CT_ICH)
    ap.add_argument("--phe", default=PHE_SICH)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 160, 224])
    ap.add_argument("--seed", type=int, default=2, help="draws of the generated junk and turns (design saw 0 and 1)")
    args = ap.parse_args()
    sizes = tuple(args.sizes)
    t0 = time.time()
    rng = np.random.default_rng(args.seed)

    ct, phe = read_dataset(args.ct_ich), read_dataset(args.phe)
    split = train_val_test_split(ct, seed=0)
    dev, held = phe_halves(phe)
    classes: dict[str, Measured] = {}
    train = measure(records(ct, split.train), sizes)
    classes["CT-ICH test patients"] = measure(records(ct, split.test), sizes)
    classes["CT-ICH validation patients"] = measure(records(ct, split.val), sizes)
    classes["CT-ICH test, turned (any angle)"] = measure(records(ct, split.test, turned(rng)), sizes)
    classes["CT-ICH test, other window (level 50, width 60)"] = measure(records(ct, split.test, other_window), sizes)
    classes["CT-ICH test, JPEG quality 30"] = measure(records(ct, split.test, jpeg), sizes)
    classes["CT-ICH test, bundled 160x160 copy"] = measure(records(*bundled_copy(ct, split.test)), sizes)
    dicoms = pydicom_files()
    classes[HEAD_CT] = measure(((item, "") for item in dicoms.pop(HEAD_CT)), sizes)
    classes["PHE-SICH development half"] = measure(records(phe, dev), sizes)
    classes["PHE-SICH test half"] = measure(records(phe, held), sizes)
    print(f"real slices measured in {time.time() - t0:.0f} s")

    junk: dict[str, list[Item]] = {"blank": blank(), "too small / not slice-shaped": odd_shapes(rng)}
    with tempfile.TemporaryDirectory() as tmp:
        junk["DICOM with nonsense RescaleSlope / Intercept"] = bad_dicoms(Path(tmp))
    junk |= {"uniform noise": noise("uniform", rng), "gaussian noise": noise("gaussian", rng),
             "natural photos": photos(), "elevation maps (matplotlib samples)": maps(), **dicoms,
             **crops(ct, split.test, rng), "charts (matplotlib)": charts(rng), "text": text()}
    for name, items in junk.items():
        classes[name] = measure(((item, "") for item in items), sizes)
    print(f"everything measured in {time.time() - t0:.0f} s\n")

    pooled = lambda *names: Measured(  # noqa: E731
        [r for n in names for r in classes[n].reasons],
        {s: np.concatenate([classes[n].features[s] for n in names]) for s in sizes}, np.array([]), [])
    classes["CT-ICH training patients (in sample)"] = train
    real = {"CT-ICH, all slices": pooled("CT-ICH training patients (in sample)", "CT-ICH validation patients",
                                         "CT-ICH test patients"),
            "PHE-SICH, all slices": pooled("PHE-SICH development half", "PHE-SICH test half")}

    print("## The dev rule: which margin each input size would pick\n")
    print("Smallest margin (over the 0.99 quantile of out-of-fold CT-ICH training distances) at which both "
          "CT-ICH training patients (out of fold) and the PHE development half pass >= 99%.\n")
    print("| size | " + " | ".join(f"PHE dev pass at {m}" for m in MARGINS)
          + " | CT-ICH train (oof) pass at 1.0 | picked |")
    print("|---" * (len(MARGINS) + 3) + "|")
    for s in sizes:
        oof = held_out_distances(train.features[s], train.groups)
        ref = InputReference.fit_features(train.features[s], margin=1.0, groups=train.groups)
        d = ref.score_features(classes["PHE-SICH development half"].features[s])
        passed = [np.mean(d < m) for m in MARGINS]
        picked = next((m for m, p in zip(MARGINS, passed) if p >= TARGET), "none")
        print(f"| {s} | " + " | ".join(f"{100 * p:.1f}%" for p in passed)
              + f" | {100 * np.mean(oof < ref.boundary):.1f}% | {picked} |")

    for s in sizes:
        ref = InputReference.fit_features(train.features[s], groups=train.groups)
        print(f"\n## {s}x{s}, gray: reference fitted on {ref.n_train} CT-ICH training slices "
              f"(quantile {ref.quantile}, margin {ref.margin}, boundary distance {ref.boundary:.2f})\n")
        print("| class | items | refused by the gate | flagged by OOD | passed | passed, of those gated in "
              "| score median / p99 | gate reasons |")
        print("|---|---|---|---|---|---|---|---|")
        slipped = []
        for name, m in [*classes.items(), *real.items()]:
            scores = ref.score_features(m.features[s]) if len(m.features[s]) else np.zeros(0)
            print(row(name, m, scores))
            if name in junk:
                slipped += [f"{n} ({v:.2f})" for n, v in zip(m.names, scores) if v < 1]
        print(f"\nJunk scored as usable at {s}: {', '.join(slipped) or 'none'}")
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
