"""Input quality: a hard gate on what a slice is, and a score of how far a model input lies from
what the model was validated on.

A classifier scores whatever it is given. A blank upload, a 1x1 PNG, a DICOM whose RescaleSlope
is NaN or a photograph would otherwise come out as "no hemorrhage flagged", which is worse than
no answer. :func:`gate` refuses what cannot be a head-CT slice at all, by cheap rules on the raw
window images (and HU where there are some). :class:`InputReference` catches what passes the
rules but is still unlike the training inputs (a crop, a chart, another body part): a
Mahalanobis distance over a few rotation-invariant image statistics of the prepared uint8 input,
so it works the same whichever runtime (Keras, int8 TFLite, a microcontroller) scores the slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from sklearn.covariance import LedoitWolf
from sklearn.model_selection import GroupKFold, KFold

from ichedge.data import DataError

REFERENCE_VERSION = 2
REFUSED = "not a usable head-CT slice"  # what every gate message says, before its reason

MIN_SIDE = 64
MAX_ASPECT = 2.0
HU_RANGE = (-10000.0, 40000.0)  # beyond what any CT stores (12-16 bit values, padding near -3000)
HEAD_THRESHOLD = 0.08  # as preprocess.head_box
WORK_SIDE = 256  # the gate looks at the brain window strided down to about this many pixels a side
MIN_HEAD_SHARE = 0.002  # of the frame: a skull cap at the vertex is about 0.003
HEAD_FILL, HEAD_ASPECT = 0.3, 4.0  # a head (or skull cap) is a blob (filled area / box); a table an arc or a bar
# Another head: a blob at least this share of the head's area, solid (fill), not an arc (aspect) and
# apart from it by this share of its width. A skull-base slice can have one such piece (a tilted
# head shows its face apart), never two: three heads are a mosaic.
MOSAIC_AREA, MOSAIC_FILL, MOSAIC_ASPECT, MOSAIC_GAP = 0.25, 0.4, 2.0, 0.1
MOSAIC_OTHERS = 2


class UnusableSlice(DataError):
    """An input that is not a usable head-CT slice; it must not be scored at all."""


def check_slice(windows: dict[str, np.ndarray], hu: np.ndarray | None = None) -> str | None:
    """None if the window images (float [0, 1], "brain" among them) can be a head-CT slice, else why not."""
    brain = np.asarray(windows["brain"])
    shapes = {np.shape(w) for w in windows.values()} | ({hu.shape} if hu is not None else set())
    if len(shapes) != 1 or brain.ndim != 2:
        return f"window images of shapes {sorted(shapes)}; one 2-D slice expected"
    h, w = brain.shape
    if min(h, w) < MIN_SIDE:
        return f"too small ({w}x{h}; at least {MIN_SIDE}x{MIN_SIDE})"
    if max(h, w) > MAX_ASPECT * min(h, w):
        return f"not slice-shaped ({w}x{h})"
    if hu is not None:
        reason = _hu_reason(hu)
        if reason:
            return f"implausible HU range ({reason})"
    ranges = {k: (float(v.min()), float(v.max())) for k, v in windows.items()}  # NaN and inf show in min/max
    if not np.isfinite(list(ranges.values())).all():
        return "non-finite pixel values"
    if ranges["brain"][1] - ranges["brain"][0] < 1e-6:
        return "constant image"
    return _head_reason(brain)


def gate(name: str, windows: dict[str, np.ndarray], hu: np.ndarray | None = None) -> None:
    """Raise :class:`UnusableSlice` naming ``name`` and the reason if the slice cannot be scored."""
    reason = check_slice(windows, hu)
    if reason is not None:
        raise UnusableSlice(f"{name}: {REFUSED}: {reason}")


def _hu_reason(hu: np.ndarray) -> str | None:
    if not np.isfinite(hu).all():
        return "non-finite values"
    lo, hi = float(hu.min()), float(hu.max())
    if lo < HU_RANGE[0] or hi > HU_RANGE[1]:
        return f"{lo:.4g} to {hi:.4g} HU"
    if (hu < -200).mean() < 0.001:
        return f"no air: {lo:.4g} to {hi:.4g} HU"
    if ((hu > -100) & (hu < 100)).mean() < 0.001:
        return f"no soft tissue: {lo:.4g} to {hi:.4g} HU"
    return None


def _head_reason(brain: np.ndarray) -> str | None:
    """The head is the largest bright blob (as head_box finds it); it must exist, be surrounded
    by background and be the only one: several far-apart heads are a mosaic or a screenshot."""
    step = -(-max(brain.shape) // WORK_SIDE)
    mask = ndimage.binary_opening(brain[::step, ::step] > HEAD_THRESHOLD, iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return "no head found"
    areas = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    boxes = ndimage.find_objects(labels)
    blobs = []
    for i in np.argsort(areas)[::-1][:8]:  # noise has thousands of specks; the head is among the largest
        box = boxes[i]
        component = labels[box] == i + 1
        fill = ndimage.binary_fill_holes(component).sum() / component.size
        if fill >= HEAD_FILL and max(component.shape) <= HEAD_ASPECT * min(component.shape):
            blobs.append((areas[i], box, fill))
    if not blobs or blobs[0][0] < MIN_HEAD_SHARE * mask.size:
        return "no head found"
    area, (rows, cols), _ = blobs[0]
    if rows.start == 0 and cols.start == 0 and rows.stop == mask.shape[0] and cols.stop == mask.shape[1]:
        return "no head found (the bright region fills the frame)"
    width = max(rows.stop - rows.start, cols.stop - cols.start)
    others = 0
    for other_area, (r, c), fill in blobs[1:]:
        gap = max(r.start - rows.stop, rows.start - r.stop, c.start - cols.stop, cols.start - c.stop, 0)
        sides = sorted((r.stop - r.start, c.stop - c.start))
        others += (other_area >= MOSAIC_AREA * area and fill >= MOSAIC_FILL and sides[1] <= MOSAIC_ASPECT * sides[0]
                   and gap >= MOSAIC_GAP * width)
    return "several heads (a mosaic or a screenshot?)" if others >= MOSAIC_OTHERS else None


# --- how far an input lies from the training inputs ---------------------------------------------

FEATURE_SIDE = 64
RINGS = (0.0, 0.3, 0.55, 0.75, 0.9, 1.05, 1.25, 1.6)  # radii in units of the head's equivalent radius
BONE = 0.9  # brain-window brightness of bone (the window saturates at 80 HU)
SECTORS = 16
OUTLINE_BINS = 32
SCALE_FLOOR = 0.01
# Cuts: the outline is traced (sub-pixel) at this many pixels a side; a support line of the head
# in each of CUT_DIRECTIONS directions counts the outline within CUT_BAND pixels of it.
CUT_SIDE = 128
CUT_DIRECTIONS = 360
CUT_BAND = 1.0
CUT_APART = 45  # degrees between the longest cut and the second one
N_FEATURES = 21
_YY, _XX = np.mgrid[:FEATURE_SIDE, :FEATURE_SIDE]
_CUT_ANGLES = np.radians(np.arange(CUT_DIRECTIONS) * 360.0 / CUT_DIRECTIONS)
_NORMALS = np.stack([np.cos(_CUT_ANGLES), np.sin(_CUT_ANGLES)])
_ALONG = np.stack([-np.sin(_CUT_ANGLES), np.cos(_CUT_ANGLES)])


def input_features(x: np.ndarray) -> np.ndarray:
    """Rotation-invariant statistics of prepared inputs (N, S, S, 3) uint8 -> (N, 21) float.

    Computed on the channel mean at 64x64 whatever S is, around the head (the largest bright
    region, as head_box finds it) and scaled by its size, so that a turned head, another field
    of view or JPEG hardly move them; what tells a head-CT slice from other pictures: the
    radial intensity profile (dark outside, a bright skull ring, gray brain inside); head area,
    solidity, elongation, bright pieces beside it and contact with the frame edge; edge
    strength; the shares of bone and of soft tissue in the head; the share of directions from
    its centre that meet bone; how elliptic its outline is (overlap with its moment ellipse,
    and the outline's high harmonics); and the two longest straight stretches of its outline,
    which is what a crop leaves (a quadrant two, at a right angle, at whatever turn).
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected prepared inputs (N, S, S, 3), got shape {x.shape}")
    return np.array([_features(image) for image in x], dtype=np.float64).reshape(len(x), N_FEATURES)


def _features(image: np.ndarray) -> list[float]:
    g = image.astype(np.float32).mean(axis=-1) / 255.0
    g = np.asarray(Image.fromarray(g, mode="F").resize((FEATURE_SIDE, FEATURE_SIDE), Image.Resampling.BILINEAR))
    mask = g > HEAD_THRESHOLD
    labels, n = ndimage.label(mask)
    if n == 0 or mask.sum() < 3:
        return [float(g.mean())] * 7 + [float(mask.mean()), 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    head = labels == 1 + int(np.argmax(ndimage.sum(mask, labels, index=np.arange(1, n + 1))))
    filled = ndimage.binary_fill_holes(head)
    area = float(head.sum())
    cy, cx = _YY[head].mean(), _XX[head].mean()

    radius = np.hypot(_YY - cy, _XX - cx) / np.sqrt(area / np.pi)
    ring = np.digitize(radius, RINGS) - 1
    profile = [float(g[ring == k].mean()) if (ring == k).any() else 0.0 for k in range(len(RINGS) - 1)]

    cov = np.cov(np.stack([_YY[filled], _XX[filled]]))
    low, high = np.linalg.eigvalsh(cov)
    elongation = 1 - np.sqrt(max(low, 0.0) / high) if high > 0 else 1.0
    hull_area = _hull_area(filled)
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]]).mean()
    shape = [area / g.size, area / hull_area, elongation, float(mask.sum() - area) / float(mask.sum()), float(border)]

    grad = np.hypot(ndimage.sobel(g, 0), ndimage.sobel(g, 1)) / 8
    inside = g[head]
    sector = ((np.arctan2(_YY - cy, _XX - cx) + np.pi) / (2 * np.pi) * SECTORS).astype(int) % SECTORS
    brightest = ndimage.maximum(g, labels=np.where(head, sector + 1, 0), index=np.arange(1, SECTORS + 1))
    tissue = [float(grad[head].mean()), float((grad > 0.1).mean()), float((inside >= 0.96).mean()),
              float(((inside > 0.1) & (inside < BONE)).mean()), float(np.mean(np.nan_to_num(brightest) >= BONE))]

    offsets = np.stack([_YY - cy, _XX - cx], axis=-1)
    ellipse = np.einsum("...i,ij,...j->...", offsets, np.linalg.pinv(cov), offsets) <= 4  # a uniform ellipse's extent
    overlap = float((ellipse & filled).sum() / (ellipse | filled).sum())
    return [*profile, *shape, *tissue, overlap, _outline_roughness(filled, cy, cx), *_cuts(image)]


def _hull_area(mask: np.ndarray) -> float:
    """Area of the mask's convex hull (of its pixels' corners)."""
    rows, cols = np.nonzero(mask ^ ndimage.binary_erosion(mask))
    corners = np.concatenate([np.stack([rows + dy, cols + dx], 1) for dy in (0, 1) for dx in (0, 1)]).astype(float)
    try:
        return float(ConvexHull(corners).volume)
    except QhullError:
        return max(float(mask.sum()), 1.0)


def _cuts(image: np.ndarray) -> list[float]:
    """The longest and the second longest straight stretch of the head's outline (the second at
    least CUT_APART degrees from the first), in units of the head's equivalent diameter.

    A stretch is the length of a support line of the head (a tangent it lies wholly on one side
    of) that its outline covers, within CUT_BAND pixels: a curved outline touches its tangents
    over a short chord, a cut follows one over its whole length, at any angle. Covered length
    (not the span of the touching points) leaves out a tangent touching two bumps; the outline
    is traced to a fraction of a pixel (where the image crosses the head threshold) so that a
    slanted cut is not a staircase.
    """
    g = image.astype(np.float32).mean(axis=-1) / 255.0
    g = np.asarray(Image.fromarray(g, mode="F").resize((CUT_SIDE, CUT_SIDE), Image.Resampling.BILINEAR))
    mask = g > HEAD_THRESHOLD
    labels, n = ndimage.label(mask)
    if n == 0:
        return [1.0, 1.0]
    head = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(ndimage.sum(mask, labels, index=np.arange(1, n + 1)))))
    points = _outline_points(g, head)
    projection = points @ _NORMALS
    near = projection >= projection.max(axis=0) - CUT_BAND
    along = np.floor(points @ _ALONG).astype(np.int64)  # one-pixel bins along each support line
    along -= along.min()
    occupied = np.zeros((CUT_DIRECTIONS, int(along.max()) + 1), bool)  # direction x bin: covered?
    rows, directions = np.nonzero(near)
    occupied[directions, along[rows, directions]] = True
    covered = occupied.sum(axis=1).astype(np.float64)
    covered /= 2 * np.sqrt(head.sum() / np.pi)
    first = int(np.argmax(covered))
    apart = np.abs((np.arange(CUT_DIRECTIONS) - first + CUT_DIRECTIONS / 2) % CUT_DIRECTIONS - CUT_DIRECTIONS / 2)
    apart = apart * 360.0 / CUT_DIRECTIONS > CUT_APART
    return [float(covered[first]), float(covered[apart].max())]


def _outline_points(g: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(P, 2) sub-pixel points of the region's outline: between each region pixel and a 4-neighbour
    outside it, where g crosses HEAD_THRESHOLD (linearly); past the frame edge, half a pixel out."""
    points = []
    padded_g, padded = np.pad(g, 1), np.pad(region, 1)  # outside the frame: background
    for axis in (0, 1):
        for step in (1, -1):
            neighbour = np.roll(padded, -step, axis=axis)[1:-1, 1:-1]
            rows, cols = np.nonzero(region & ~neighbour)
            outside = np.roll(padded_g, -step, axis=axis)[1:-1, 1:-1][rows, cols]
            inside = g[rows, cols]
            t = np.clip((inside - HEAD_THRESHOLD) / np.maximum(inside - outside, 1e-6), 0.0, 1.0)
            at_edge = (rows if axis == 0 else cols) == (g.shape[axis] - 1 if step == 1 else 0)
            t = np.where(at_edge, 0.5, t)
            offset = np.stack([step * t * (axis == 0), step * t * (axis == 1)], axis=1)
            points.append(np.stack([rows, cols], axis=1) + offset)
    return np.concatenate(points)


def _outline_roughness(filled: np.ndarray, cy: float, cx: float) -> float:
    """Share of the outline's radius-by-angle signature beyond its second harmonic (an ellipse has none)."""
    rows, cols = np.nonzero(filled ^ ndimage.binary_erosion(filled))
    angle = ((np.arctan2(rows - cy, cols - cx) + np.pi) / (2 * np.pi) * OUTLINE_BINS).astype(int) % OUTLINE_BINS
    signature = ndimage.maximum(np.hypot(rows - cy, cols - cx), labels=angle + 1, index=np.arange(1, OUTLINE_BINS + 1))
    power = np.abs(np.fft.rfft(np.nan_to_num(signature))) ** 2
    return float(np.sqrt(power[3:].sum() / max(power.sum(), 1e-9)))


@dataclass
class InputReference:
    """Where a model's training inputs lie in feature space, and the boundary of "like them".

    ``score`` is the Mahalanobis distance (Ledoit-Wolf covariance of standardised features)
    divided by ``boundary``: 1.0 and above means outside what the model was validated on.
    """

    mean: np.ndarray
    scale: np.ndarray
    precision: np.ndarray
    boundary: float
    n_train: int
    quantile: float
    margin: float

    @classmethod
    def fit(cls, x: np.ndarray, quantile: float = 0.99, margin: float = 1.25, groups: np.ndarray | None = None,
            folds: int = 5, seed: int = 0) -> InputReference:
        """Fit on a model's training inputs (N, S, S, 3) uint8; ``groups`` (patients) keep folds apart.

        The boundary is ``margin`` times the ``quantile`` of out-of-fold training distances
        (each slice measured by a reference fitted without its patient), since in-sample
        distances are optimistic about new slices, and slices of one patient resemble each other.
        """
        return cls.fit_features(input_features(x), quantile, margin, groups, folds, seed)

    @classmethod
    def fit_features(cls, f: np.ndarray, quantile: float = 0.99, margin: float = 1.25,
                     groups: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> InputReference:
        """:meth:`fit` on :func:`input_features` already computed."""
        if len(f) < 2:
            raise ValueError(f"{len(f)} input(s) are too few to fit an input reference on")
        boundary = float(np.quantile(held_out_distances(f, groups, folds, seed), quantile) * margin)
        return cls(*_moments(f), boundary=boundary, n_train=len(f), quantile=quantile, margin=margin)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Distance over the boundary: >= 1 is outside what the model was validated on."""
        return self.score_features(input_features(x))

    def score_features(self, f: np.ndarray) -> np.ndarray:
        return _distances(f, self.mean, self.scale, self.precision) / self.boundary

    def outside(self, x: np.ndarray) -> np.ndarray:
        return self.score(x) >= 1.0

    def to_json(self) -> dict:
        return {"version": REFERENCE_VERSION, "features": "ichedge.quality.input_features", "n_train": self.n_train,
                "quantile": self.quantile, "margin": self.margin, "boundary": self.boundary,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> InputReference:
        if d.get("version") != REFERENCE_VERSION or len(d.get("mean", ())) != N_FEATURES:
            raise DataError(f"input reference version {d.get('version')!r} of {len(d.get('mean', ()))} features; "
                            f"this ichedge reads version {REFERENCE_VERSION} of {N_FEATURES}")
        return cls(np.array(d["mean"]), np.array(d["scale"]), np.array(d["precision"]), float(d["boundary"]),
                   int(d["n_train"]), float(d["quantile"]), float(d["margin"]))


def held_out_distances(f: np.ndarray, groups: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Each row's distance from a reference fitted on the other folds (grouped by ``groups`` if given);
    in-sample distances where there are too few rows or groups to hold any out."""
    units = len(np.unique(groups)) if groups is not None else len(f)
    folds = min(folds, units)
    if folds < 2:
        return _distances(f, *_moments(f))
    splitter = GroupKFold(folds, shuffle=True, random_state=seed) if groups is not None else \
        KFold(folds, shuffle=True, random_state=seed)
    out = np.empty(len(f))
    for train, test in splitter.split(f, groups=groups):
        out[test] = _distances(f[test], *_moments(f[train]))
    return out


def _moments(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, scale and precision of standardised features, each feature's spread at least SCALE_FLOOR.

    Differences below a hundredth of a feature's unit range are resampling noise, not a new kind
    of input: without the floor, a feature that training hardly moved (nothing at the frame edge)
    would flag any slice that moves it at all.
    """
    mean = f.mean(axis=0)
    scale = np.maximum(f.std(axis=0), SCALE_FLOOR)
    cov = LedoitWolf().fit((f - mean) / scale).covariance_
    cov += np.diag(np.maximum(1.0 - np.diag(cov), 0.0))  # floored features: variance 1 in floor units
    return mean, scale, np.linalg.inv(cov)


def _distances(f: np.ndarray, mean: np.ndarray, scale: np.ndarray, precision: np.ndarray) -> np.ndarray:
    z = (f - mean) / scale
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", z, precision, z), 0.0))
