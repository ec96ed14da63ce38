"""Site-robust training, measured on a second hospital (issue 15, item 3; an experiment, not a test).

Trains on CT-ICH and scores PHE-SICH, another hospital's head CT (other scanner, a wider window,
heads turned about 90 degrees; read from its folder, never copied). Each variant changes how the
frozen-feature model of `ichedge sweep --grid 224x0.35 --head multilevel` is trained or fed:

- a preprocessing step applied to every image, training and test alike (orientation from the
  head mask, intensity standardisation inside the head);
- training-time augmentation: with a frozen backbone, the features of a few augmented copies of
  each training image join the originals (rotations, window / gamma, resolution and crop,
  blur / noise / JPEG);
- test-time augmentation: scores averaged over quarter turns of the model input;
- the slice-context stage (`--context`) after the head;
- multi-source training: the PHE development patients join every fold's training patients
  (their own scores out of fold: each half of them scored by a fit on the other half).

With --phe-upright, PHE-SICH is turned a quarter clockwise before anything else, upright as
CT-ICH shows heads: what a site whose scanner shows heads upright would send.

Protocol: PHE-SICH patients are split once (seed 0) into a development half and a test half.
Choices are made on CT-ICH validation patients and PHE development patients only; the PHE test
half is reported, never chosen on. CT-ICH: the 5 patient folds of `ichedge sweep --cv --seed 0`;
a logistic multilevel head (ichedge's int8-safe fit) per fold on its training patients, the
threshold set on its validation patients for sensitivity 0.95 (the shipped threshold). Printed,
as a markdown table, per variant: CT-ICH mean validation AUC, test AUC (mean ± sd over folds,
and pooled); on each PHE half, slice AUC and sensitivity / specificity at the shipped threshold
(means over the 5 fold models); the shipped threshold and the one that would have given
sensitivity 0.95 on PHE development patients (the drift). PHE-SICH has no normal patients:
its specificity is over the slices without a bleed of bleeding patients.

Features are cached as .npy files under --cache (delete it after changing a transform).

    python bench/site_robustness.py [variant ...] [--phe-upright] [--ct-ich CT_ICH] [--phe PHE_SICH]
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from common import ALPHA, DEFAULT_DATA, Head, TARGET, gap, gap_gmp, inner_folds, parser, patient_folds, read_data
from ichedge.context import SliceContext
from ichedge.data import Dataset, Split, read_image
from ichedge.evaluation import binary_metrics, threshold_for_sensitivity
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import head_box

PHE_DATA = "../shared/data/phe-sich/labels.csv"
CACHE = Path("/tmp/ichedge-robust-cache")

# Orientation augmentation: measured here and not kept in the package (see docs/accuracy.md).
MAX_TILT = 10.0  # degrees either way beside the quarter turns: heads lie a little tilted on the table


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """``image`` (h, w) or (h, w, c) turned counter-clockwise by ``degrees`` about its centre,
    bilinear, zero where nothing was; the dtype is kept (integers rounded)."""
    planes = image[..., None] if image.ndim == 2 else image
    out = np.stack([np.asarray(Image.fromarray(planes[..., c].astype(np.float32), mode="F").rotate(
        degrees, Image.Resampling.BILINEAR, fillcolor=0.0), dtype=np.float32) for c in range(planes.shape[-1])], -1)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    out = out.astype(image.dtype)
    return out[..., 0] if image.ndim == 2 else out


def any_orientation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random quarter-turn multiple, then up to :data:`MAX_TILT` degrees either way: a head as a
    scanner of another site might show it (PHE-SICH's face left, CT-ICH's up)."""
    return rotate(np.rot90(image, int(rng.integers(4))), float(rng.uniform(-MAX_TILT, MAX_TILT)))

SIZE = 224
TAP_LAYERS = ("block_13_expand_relu", "block_16_project_BN")
Crop = np.ndarray  # a head crop, float [0, 1], at the source's resolution
Rng = np.random.Generator


# --- transforms of a head crop ------------------------------------------------------------------


def to_input(crop: Crop) -> np.ndarray:
    """A crop as ichedge's gray model input plane: bilinear resize to SIZE, uint8 (prepare_slice)."""
    im = Image.fromarray(crop.astype(np.float32), mode="F").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(im, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _head_mask(crop: Crop, side: int = 128) -> np.ndarray:
    """The head's filled mask at a reduced side (moments and percentiles need no more)."""
    small = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize((side, side)), dtype=np.float32)
    mask = ndimage.binary_opening(small > 0.08, iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def orient(crop: Crop) -> Crop:
    """Rotate the head's long (principal) axis to vertical, its heavier end (the occiput: the head
    is widest behind) down, as CT-ICH shows heads."""
    mask = _head_mask(crop)
    if mask.sum() < 50:
        return crop
    r, c = np.nonzero(mask)
    d = np.vstack([r - r.mean(), c - c.mean()])
    major = np.linalg.eigh(np.cov(d))[1][:, 1]  # (row, col) direction of the long axis
    along = major @ d
    if (along ** 3).mean() > 0:  # the long tail (the front) lies along +major: make +major point up
        major = -major
    # Angle, counter-clockwise in the picture, that turns +major (the back) to straight down.
    angle = np.degrees(np.arctan2(major[1], major[0]))
    return rotate(crop, -angle) if abs(angle) > 1 else crop


TISSUE = (0.02, 0.98)  # brain-window values that are neither clipped air nor clipped bone
REFERENCE = (0.45, 0.10)  # about CT-ICH's median and interquartile range of head tissue (its histogram)


def standardise(crop: Crop) -> Crop:
    """Map head tissue's median and interquartile range to CT-ICH's: a wider or shifted window is
    (up to clipping) linear in HU, so a linear map inside the window undoes it. Clipped pixels stay
    clipped, as in any brain window."""
    mask = _head_mask(crop)
    small = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(mask.shape[::-1]), np.float32)
    v = small[mask & (small > TISSUE[0]) & (small < TISSUE[1])]
    if v.size < 50:
        return crop
    q25, q50, q75 = np.percentile(v, (25, 50, 75))
    gain = float(np.clip(REFERENCE[1] / max(q75 - q25, 1e-3), 0.5, 2.0))
    out = np.clip(REFERENCE[0] + (crop - q50) * gain, 0, 1)
    out[crop <= TISSUE[0]] = 0.0
    out[crop >= TISSUE[1]] = 1.0
    return out.astype(np.float32)


def window_jitter(crop: Crop, rng: Rng) -> Crop:
    """Another window on the same HU: width x 0.8 to 2.5 (contrast / 0.8..2.5 about the middle),
    level moved by up to 10 HU (0.125 of CT-ICH's 80 HU), clipped air and bone kept clipped, then
    gamma 0.8 to 1.25."""
    width = np.exp(rng.uniform(np.log(0.8), np.log(2.5)))
    shift = rng.uniform(-0.125, 0.125)
    out = np.clip(0.5 + (crop - 0.5 - shift) / width, 0, 1)
    out[crop <= TISSUE[0]] = 0.0
    out[crop >= TISSUE[1]] = 1.0
    return (out ** np.exp(rng.uniform(np.log(0.8), np.log(1.25)))).astype(np.float32)


def resolution_crop_jitter(crop: Crop, rng: Rng) -> Crop:
    """The head crop's box scaled by 0.9 to 1.12 and shifted by up to 4% of its side, then the
    detail of a source 0.5 to 1 times the model input's resolution."""
    side = crop.shape[0]
    zoom, (dy, dx) = rng.uniform(0.9, 1.12), rng.uniform(-0.04, 0.04, 2) * side
    centre = (side - 1) / 2
    # PIL's affine maps output to input pixels: x_in = a x_out + b y_out + c.
    coeffs = (zoom, 0, centre - zoom * centre + dx, 0, zoom, centre - zoom * centre + dy)
    im = Image.fromarray(crop.astype(np.float32), mode="F").transform(
        (side, side), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=0.0)
    low = max(16, int(round(SIZE * rng.uniform(0.5, 1.0))))
    return np.asarray(im.resize((low, low), Image.Resampling.BILINEAR), dtype=np.float32)


def degrade(crop: Crop, rng: Rng) -> Crop:
    """At 256 pixels a side (a 512-pixel scan's head, halved): Gaussian blur of sigma 0 to 1 pixel,
    Gaussian noise of sd 0 to 0.02, JPEG re-compression at quality 50 to 95."""
    im = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize((256, 256), Image.Resampling.BILINEAR))
    im = ndimage.gaussian_filter(im, rng.uniform(0, 1.0))
    im = np.clip(im + rng.normal(0, rng.uniform(0, 0.02), im.shape), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((im * 255 + 0.5).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(50, 96)))
    return np.asarray(Image.open(buf).convert("L"), dtype=np.float32) / 255.0


PREPARE: dict[str, Callable[[Crop], Crop]] = {"orient": orient, "standardise": standardise}
AUGMENT: dict[str, Callable[[Crop, Rng], Crop]] = {
    "rotate": any_orientation, "window": window_jitter, "resolution": resolution_crop_jitter, "degrade": degrade}


def chain(names: str, table: dict) -> list:
    """The transforms named in ``names`` ("a+b", "" for none), in order."""
    return [table[n] for n in names.split("+") if n]


# --- variants ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    help: str
    prepare: str = ""  # PREPARE names joined by "+": every image, training and test
    augment: str = ""  # AUGMENT names joined by "+": each training copy
    copies: int = 0  # augmented copies per training image, beside the original
    turns: bool = False  # test-time average over the four quarter turns of the model input
    multi_source: bool = False  # PHE development patients in every fold's training
    context: bool = False  # the slice-context stage (`--context`) after the head


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("224x224, alpha 0.35, head crop, gray, multilevel head (`--head multilevel`)"),
    "context": Variant("the baseline with the slice-context stage (`--context`, as `make best`)", context=True),
    "orient": Variant("orientation from the head mask: long axis vertical, heavier end down", prepare="orient"),
    "rotate": Variant("training copies turned by a random quarter-turn multiple ± 10°", augment="rotate", copies=3),
    "rotate+tta": Variant("the same, scores averaged over the four quarter turns", augment="rotate", copies=3,
                          turns=True),
    "window": Variant("training copies at another window and gamma", augment="window", copies=2),
    "standardise": Variant("head tissue's median and IQR mapped to CT-ICH's", prepare="standardise"),
    "resolution": Variant("training copies with crop box and resolution jitter", augment="resolution", copies=2),
    "degrade": Variant("training copies blurred, noised, JPEG re-compressed", augment="degrade", copies=2),
    "multi-source": Variant("PHE development patients added to training (dev scores: each half of them from "
                            "a fit on the other half)", multi_source=True),
    "multi-source+context": Variant("the same, with the slice-context stage", multi_source=True, context=True),
    "multi-source+rotate": Variant("the same, with the rotated CT-ICH copies", augment="rotate", copies=3,
                                   multi_source=True),
}


# --- inputs and features -------------------------------------------------------------------------


def head_boxes(cache: Path, name: str, ds: Dataset) -> np.ndarray:
    """ichedge's head box of every image (top, left, bottom, right), cached."""
    path = cache / f"{name}-boxes.npy"
    if not path.exists():
        np.save(path, np.array([head_box(read_image(r.path)) for r in ds.records], dtype=np.int64))
    return np.load(path)


class Features:
    """The multilevel taps (GAP block_13_expand_relu, GAP + GMP block_16_project_BN) of model
    inputs, with each input's block_16 map minimum and maximum (for the int8-safe fit)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        backbone = build_model(ALPHA, SIZE, resolve_weights(ALPHA, SIZE)).get_layer("backbone")
        self.model = keras.Model(backbone.input, [backbone.get_layer(n).output for n in TAP_LAYERS])
        self.seconds = 0.0

    def __call__(self, planes: np.ndarray) -> np.ndarray:
        start, out = time.perf_counter(), []
        for chunk in np.array_split(planes, max(1, len(planes) // 256)):
            x = np.repeat(chunk[..., None], 3, -1).astype("float32") / 127.5 - 1
            b13, b16 = self.model.predict(x, batch_size=32, verbose=0)
            out.append(np.c_[gap(b13), gap_gmp(b16), b16.min((1, 2, 3)), b16.max((1, 2, 3))])
        self.seconds += time.perf_counter() - start
        return np.concatenate(out)


def feature_set(features: Features, name: str, ds: Dataset, boxes: np.ndarray, prepare: str, augment: str = "",
                copy: int = 0, turn: int = 0, source_turn: int = 0) -> np.ndarray:
    """Features of every image of ``ds``: cropped, turned by ``source_turn`` quarter turns (as
    another site might show it), prepared, augmented (copy ``copy``'s seed), the model input turned
    by ``turn`` quarter turns (test-time views); cached in ``features.cache``."""
    key = "-".join(filter(None, (name, source_turn and f"source{source_turn % 4}", prepare or "plain",
                                 augment and f"{augment}{copy}", turn and f"turn{turn}")))
    path = features.cache / f"{key}.npy"
    if path.exists():
        return np.load(path)
    steps = chain(prepare, PREPARE)
    augs = chain(augment, AUGMENT)
    planes = np.zeros((len(ds), SIZE, SIZE), np.uint8)
    for i, (record, (t, l, b, r)) in enumerate(zip(ds.records, boxes)):
        crop = np.rot90(read_image(record.path)[t:b, l:r], source_turn)
        rng = np.random.default_rng([copy, i])
        for f in steps:
            crop = f(crop)
        for f in augs:
            crop = f(crop, rng)
        planes[i] = np.rot90(to_input(crop), turn)
    out = features(planes)
    np.save(path, out)
    return out


# --- evaluation ---------------------------------------------------------------------------------


def phe_halves(phe: Dataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the PHE development and test patients (half each, seeded)."""
    patients = np.random.default_rng(seed).permutation(sorted(set(phe.groups)))
    dev = np.isin(phe.groups, patients[: len(patients) // 2])
    return dev, ~dev


@dataclass
class Sets:
    """Feature rows of both sites for one variant: the test-time view (per turn when averaged) and
    the training copies of CT-ICH."""

    ct: list[np.ndarray]  # test-time views: [plain] or the four turns
    phe: list[np.ndarray]
    ct_copies: list[np.ndarray]


class Rows:
    """One variant's feature rows, both sites stacked, and fits of the head on any of them."""

    def __init__(self, sets: Sets, y_ct: np.ndarray, y_phe: np.ndarray) -> None:
        self.n_ct, self.n_phe = len(y_ct), len(y_phe)
        stacked = np.concatenate(sets.ct + sets.ct_copies + sets.phe)
        self.f, self.span = stacked[:, :-2], stacked[:, -2:]
        blocks = len(sets.ct) + len(sets.ct_copies)
        self.y = np.concatenate([y_ct] * blocks + [y_phe] * len(sets.phe))
        self.phe_start = self.n_ct * blocks
        self.ct_views = [k * self.n_ct for k in range(len(sets.ct))]
        self.copies = [self.n_ct * (len(sets.ct) + j) for j in range(len(sets.ct_copies))]
        self.phe_views = [self.phe_start + k * self.n_phe for k in range(len(sets.phe))]

    def scores(self, ct_train: np.ndarray, phe_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """CT-ICH and PHE scores (averaged over the test-time views) of the head fitted on CT-ICH
        rows ``ct_train`` with their copies, and PHE rows ``phe_train``."""
        train = np.concatenate([ct_train] + [start + ct_train for start in self.copies] + [self.phe_start + phe_train])
        p = Head(map_range=self.span).scores(self.f, self.y, train, np.arange(len(self.y)))
        return (np.mean([p[k:k + self.n_ct] for k in self.ct_views], 0),
                np.mean([p[k:k + self.n_phe] for k in self.phe_views], 0))


def dev_halves(phe: Dataset, dev: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The PHE development patients in two halves (seed 0), as (rows, the other half's rows) pairs."""
    patients = np.random.default_rng(0).permutation(sorted(set(phe.groups[dev])))
    first = dev & np.isin(phe.groups, patients[: len(patients) // 2])
    a, b = np.nonzero(first)[0], np.nonzero(dev & ~first)[0]
    return [(a, b), (b, a)]


def slice_numbers(ds: Dataset) -> np.ndarray:
    """Each record's slice number, the context stage's order."""
    return np.array([r.slice for r in ds.records], dtype=np.float64)


def evaluate(rows: Rows, ct: Dataset, phe: Dataset, splits: list[Split], dev: np.ndarray, test: np.ndarray,
             v: Variant) -> dict[str, list[float]]:
    """Per fold: fit on CT-ICH training patients (+ copies, + PHE dev), with context refit the head
    on 4 inner patient folds for the context model's out-of-fold scores, threshold on CT-ICH
    validation patients, score the CT-ICH test patients and both PHE halves."""
    y_ct, y_phe = ct.labels, phe.labels
    phe_train = np.nonzero(dev)[0] if v.multi_source else np.zeros(0, np.int64)
    out: dict[str, list[float]] = {}
    pooled_y, pooled_p = [], []
    for s in splits:
        p_ct, p_phe = rows.scores(s.train, phe_train)
        if v.multi_source:  # dev scores out of fold: each half of the dev patients from a fit on the other
            for scored, fitted in dev_halves(phe, dev):
                p_phe[scored] = rows.scores(s.train, fitted)[1][scored]
        if v.context:
            oof = np.zeros(len(y_ct))
            for inner, held in inner_folds(s.train, y_ct, ct.groups):
                oof[held] = rows.scores(inner, phe_train)[0][held]
            ctx = SliceContext.fit(oof[s.train], y_ct[s.train], ct.groups[s.train], slice_numbers(ct)[s.train])
            p_ct = ctx.apply(p_ct, ct.groups, slice_numbers(ct))
            p_phe = ctx.apply(p_phe, phe.groups, slice_numbers(phe))
        t = threshold_for_sensitivity(y_ct[s.val], p_ct[s.val], TARGET)
        values = {"val_auc": roc_auc_score(y_ct[s.val], p_ct[s.val]),
                  "test_auc": roc_auc_score(y_ct[s.test], p_ct[s.test]),
                  "threshold": t, "phe_threshold": threshold_for_sensitivity(y_phe[dev], p_phe[dev], TARGET)}
        for half, mask in (("dev", dev), ("test", test)):
            m = binary_metrics(y_phe[mask], p_phe[mask], t)
            values.update({f"phe_{half}_auc": m["auc"], f"phe_{half}_sens": m["sensitivity"],
                           f"phe_{half}_spec": m["specificity"]})
        for key, value in values.items():
            out.setdefault(key, []).append(float(value))
        pooled_y.append(y_ct[s.test])
        pooled_p.append(p_ct[s.test])
    out["pooled_auc"] = [roc_auc_score(np.concatenate(pooled_y), np.concatenate(pooled_p))]
    return out


HEADER = ("| variant | CT-ICH val AUC | CT-ICH test AUC (pooled) | PHE dev AUC | dev sens / spec | PHE test AUC "
          "| test sens / spec | threshold: shipped / for 0.95 on PHE dev | s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(name: str, r: dict[str, list[float]], seconds: float) -> str:
    """One markdown row: means over the 5 fold models."""
    m = {k: float(np.mean(v)) for k, v in r.items()}
    return (f"| {name} | {m['val_auc']:.3f} | {m['test_auc']:.3f} ± {np.std(r['test_auc'], ddof=1):.3f} "
            f"({m['pooled_auc']:.3f}) | {m['phe_dev_auc']:.3f} | {m['phe_dev_sens']:.3f} / {m['phe_dev_spec']:.3f} "
            f"| {m['phe_test_auc']:.3f} | {m['phe_test_sens']:.3f} / {m['phe_test_spec']:.3f} "
            f"| {m['threshold']:.3f} / {m['phe_threshold']:.3f} | {seconds:.0f} |")


def variant_sets(v: Variant, features: Features, ct: Dataset, phe: Dataset, boxes: tuple[np.ndarray, np.ndarray],
                 phe_turn: int) -> Sets:
    """The feature rows ``v`` needs, computed or read from the cache."""
    turns = range(4) if v.turns else [0]
    ct_views = [feature_set(features, "ct-ich", ct, boxes[0], v.prepare, turn=k) for k in turns]
    phe_views = [feature_set(features, "phe-sich", phe, boxes[1], v.prepare, turn=k, source_turn=phe_turn)
                 for k in turns]
    copies = [feature_set(features, "ct-ich", ct, boxes[0], v.prepare, v.augment, copy=j)
              for j in range(1, v.copies + 1)]
    return Sets(ct_views, phe_views, copies)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("variants", nargs="*", default=list(VARIANTS), metavar="variant",
                    help="what to measure (default: all): " + "; ".join(f"{k}: {v.help}" for k, v in VARIANTS.items()))
    ap.add_argument("--ct-ich", default=DEFAULT_DATA, help=f"CT-ICH labels.csv (default: {DEFAULT_DATA})")
    ap.add_argument("--phe", default=PHE_DATA, help=f"PHE-SICH labels.csv (default: {PHE_DATA})")
    ap.add_argument("--cache", type=Path, default=CACHE, help=f"feature cache folder (default: {CACHE})")
    ap.add_argument("--phe-upright", action="store_true",
                    help="turn PHE-SICH a quarter clockwise first, upright as CT-ICH (its heads face left)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the CT-ICH folds and the PHE halves (default 0)")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.cache.mkdir(parents=True, exist_ok=True)
    ct, phe = read_data(args.ct_ich), read_data(args.phe)
    start = time.perf_counter()
    boxes = head_boxes(args.cache, "ct-ich", ct), head_boxes(args.cache, "phe-sich", phe)
    print(f"head boxes: {time.perf_counter() - start:.0f} s", flush=True)
    splits = patient_folds(ct, seed=args.seed)
    dev, test = phe_halves(phe, args.seed)
    print(f"PHE halves: dev {len(set(phe.groups[dev]))} patients, {dev.sum()} slices ({phe.labels[dev].sum()} "
          f"positive); test {len(set(phe.groups[test]))} patients, {test.sum()} slices "
          f"({phe.labels[test].sum()} positive)")
    features = Features(args.cache)
    rows = []
    for name in args.variants:
        v = VARIANTS[name]
        start = time.perf_counter()
        sets = variant_sets(v, features, ct, phe, boxes, -1 if args.phe_upright else 0)
        r = evaluate(Rows(sets, ct.labels, phe.labels), ct, phe, splits, dev, test, v)
        rows.append(row(name, r, time.perf_counter() - start))
        print(rows[-1], flush=True)
    print(f"\nfeatures: {features.seconds:.0f} s in all\n\n{HEADER}\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
