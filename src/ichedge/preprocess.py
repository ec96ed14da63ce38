"""Pixels to model input: head crop, channel mode, resize.

One code path feeds training, evaluation and prediction, and the settings travel with the model
(:class:`Preprocessing` is stored in every run folder), so a model is never fed differently
from how it was trained. Model inputs are uint8 pixel values 0..255; the model itself rescales
them to MobileNetV2's [-1, 1], which keeps int8 export and microcontroller input simple.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from ichedge.channels import CHANNEL_MODES, NEXT, PREVIOUS, ChannelMode, channel_mode
from ichedge.data import DICOM_KEY, DataError, Dataset, Record, read_image
from ichedge.dicom import read_ct_slice, windowed
from ichedge.quality import gate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocessing:
    """How slices become model input; recorded in the run folder and the model card."""

    size: int = 96
    channels: str = "gray"
    crop: bool = True
    normalisation: str = "pixels 0..255 in, rescaled to [-1, 1] inside the model"

    def __post_init__(self) -> None:
        CHANNEL_MODES.get(self.channels)  # ValueError naming the modes
        if self.size < 32:
            raise ValueError(f"input size must be at least 32, got {self.size}")

    @property
    def mode(self) -> ChannelMode:
        return channel_mode(self.channels)

    @property
    def windows(self) -> tuple[str, ...]:
        return self.mode.windows

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        """From what :meth:`to_json` wrote (a run's config, a model card)."""
        return cls(size=data["size"], channels=data["channels"], crop=data["crop"])


def head_box(image: np.ndarray, threshold: float = 0.08, margin: float = 0.04) -> tuple[int, int, int, int]:
    """Square box (top, left, bottom, right) around the head in a CT slice.

    The head is the largest bright connected region, which leaves out the scanner table and
    stray text. A blank image gives the whole frame.
    """
    h, w = image.shape
    mask = ndimage.binary_opening(image > threshold, iterations=2)
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0, 0, h, w
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = int(max(bottom - top, right - left) * (1 + 2 * margin))
    side = min(max(side, 16), h, w)
    cy, cx = (top + bottom) // 2, (left + right) // 2
    top = int(np.clip(cy - side // 2, 0, h - side))
    left = int(np.clip(cx - side // 2, 0, w - side))
    return top, left, top + side, left + side


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(image.astype(np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def prepare_slice(windows: dict[str, np.ndarray], pre: Preprocessing) -> np.ndarray:
    """Window images (float [0, 1], same shape) to one uint8 model input (size, size, 3)."""
    shapes = {w.shape for w in windows.values()}
    if len(shapes) != 1:
        raise DataError(f"window images differ in size: {sorted(shapes)}")
    if pre.crop:  # one box, from the brain window of the slice itself, for every plane
        t, l, b, r = head_box(windows["brain"])
        windows = {k: v[t:b, l:r] for k, v in windows.items()}
    planes = pre.mode.planes(windows, lambda image: _resize(image, pre.size))
    return np.clip(np.stack(planes, axis=-1) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def record_windows(record: Record, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named window images of a record: from its window images, or computed from its DICOM."""
    return _record_pixels(record, names)[0]


def _record_pixels(record: Record, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The named windows of a record, and its HU where it is a DICOM slice."""
    if DICOM_KEY in record.images:
        hu = read_ct_slice(record.images[DICOM_KEY]).hu
        return windowed(hu, names), hu
    missing = [w for w in names if w not in record.images]
    if missing:
        raise DataError(f"{record.path}: no {'/'.join(missing)} image (a DICOM source gives every window)")
    return {w: read_image(record.images[w]) for w in names}, None


def load_record(record: Record, pre: Preprocessing, neighbours: tuple[Record, Record] | None = None,
                check: bool = False) -> np.ndarray:
    """One record as model input; 2.5d mode also needs the records of the slices around it.
    ``check`` puts it through the quality gate first (:func:`ichedge.quality.gate`)."""
    windows, hu = _record_pixels(record, pre.windows)
    if check:
        gate(str(record.path), windows, hu)
    if "neighbours" in pre.mode.needs:
        if neighbours is None:
            raise DataError(f"{record.path}: channel mode {pre.channels} needs the neighbouring slices")
        for name, other in zip((PREVIOUS, NEXT), neighbours):
            windows[name] = _neighbour_image(record, other, windows["brain"])
    try:
        return prepare_slice(windows, pre)
    except DataError as exc:
        raise DataError(f"{record.path}: {exc}") from None


def _neighbour_image(record: Record, other: Record, own: np.ndarray) -> np.ndarray:
    """A neighbouring slice's brain window; the slice's own if that one is missing or unreadable."""
    if other is record:
        return own
    try:
        image = record_windows(other, ("brain",))["brain"]
    except DataError as exc:
        log.warning("%s: neighbour unusable, the slice stands in for it (%s)", record.path, exc)
        return own
    return image if image.shape == own.shape else own


def neighbour_records(ds: Dataset, mode: str = "2.5d") -> list[tuple[Record, Record]]:
    """For each record, the records of the slices just below and above (itself at the ends)."""
    if not ds.has_slice_order:
        raise DataError(f"{ds.name}: channel mode {mode} needs patient IDs and slice numbers")
    by_key = {(r.patient, r.slice): r for r in ds.records}
    return [(by_key.get((r.patient, r.slice - 1), r), by_key.get((r.patient, r.slice + 1), r)) for r in ds.records]


@dataclass
class Loaded:
    """Model inputs for the readable records of a dataset, and what could not be read."""

    x: np.ndarray
    y: np.ndarray
    indices: np.ndarray
    errors: list[str]


def load_inputs(ds: Dataset, pre: Preprocessing, indices: Sequence[int] | None = None, progress: bool = False,
                check: bool = False) -> Loaded:
    """Load and preprocess records; an unreadable image is reported and skipped, never fatal.

    ``check`` refuses what the quality gate refuses, as the triage does (evaluation); training
    takes its labelled data as given.
    """
    idx = range(len(ds)) if indices is None else indices
    around = neighbour_records(ds, pre.channels) if "neighbours" in pre.mode.needs else None
    xs, kept, errors = [], [], []
    for i in tqdm(idx, desc="loading images", disable=not progress, leave=False):
        try:
            xs.append(load_record(ds.records[i], pre, around[i] if around else None, check))
            kept.append(i)
        except DataError as exc:
            errors.append(str(exc))
            log.warning("skipped: %s", exc)
    shape = (0, pre.size, pre.size, 3)
    x = np.stack(xs) if xs else np.zeros(shape, np.uint8)
    kept_arr = np.array(kept, dtype=np.int64)
    return Loaded(x, ds.labels[kept_arr] if kept else np.zeros(0, np.int64), kept_arr, errors)


def patient_groups(dataset: Dataset, inputs: Loaded) -> np.ndarray | None:
    """The patient of each loaded input, or None when the layout has no patient IDs."""
    return dataset.groups[inputs.indices] if dataset.has_patients else None


def slice_order(dataset: Dataset, inputs: Loaded) -> np.ndarray | None:
    """The slice number of each loaded input, or None when patients or slice numbers are unknown."""
    records = [dataset.records[i] for i in inputs.indices]
    if not dataset.has_patients or any(r.slice is None for r in records):
        return None
    return np.array([r.slice for r in records], dtype=np.float64)
