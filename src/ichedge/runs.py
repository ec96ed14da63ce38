"""The run folder: what one training run made, its versioned layout, and atomic writing.

Every reader and writer of a run folder goes through this module; no other module spells one
of its file names. The layout (docs/run-folder.md)::

    RUN/config.json        settings, preprocessing, weights, dataset, split keys, "layout": 2
        model.keras        the Keras classifier (uint8 pixels in, probability out)
        history.csv        per-epoch training curves
        metrics.json       test metrics at 0.5 and at the validated thresholds, intervals
        predictions.npz    validation and test probabilities and labels
        context.json       the fitted slice-context stage (runs trained with --context)
        input_reference.json  the training inputs' statistics, for the OOD score (ichedge.quality)
        plots/, report.html
        export[-N]/        model_float32.tflite, model_int8.tflite, model_int8.h/.cc,
                           model_card.json/.md, profile.json
        site_profiles/     thresholds re-chosen on a site's own sample (`ichedge calibrate`):
                           SITE-YYYYmmddTHHMMSSZ.json, one per calibration, the newest used

Layout 1 is the same files without the ``layout`` key (ichedge 0.1 before this module): it opens, upgraded
in memory. A layout newer than :data:`LAYOUT_VERSION` is refused with a message. Folders are
written under a hidden temporary name and renamed into place when complete
(:func:`new_folder`), so no half-written run is ever seen and nothing is overwritten.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ichedge.context import SliceContext
from ichedge.data import DataError, read_dataset
from ichedge.preprocess import Loaded, Preprocessing, load_inputs, patient_groups, slice_order

log = logging.getLogger(__name__)

LAYOUT_VERSION = 2

CONFIG, MODEL, HISTORY, METRICS = "config.json", "model.keras", "history.csv", "metrics.json"
PREDICTIONS, CONTEXT, PLOTS, REPORT = "predictions.npz", "context.json", "plots", "report.html"
REFERENCE = "input_reference.json"
EXPORT, SITE_PROFILES = "export", "site_profiles"
# A site profile: SITE-STAMP[-N].json in SITE_PROFILES, N where two calibrations share a second.
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SITE_STAMP = "%Y%m%dT%H%M%SZ"
_SITE_PROFILE = re.compile(r"(?P<site>.+)-(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?\.json")
# An export folder: each exported runtime's model file, the C array of the int8 one, the card.
EXPORT_MODELS = {"float32": "model_float32.tflite", "int8": "model_int8.tflite"}
C_ARRAY = "model_int8"  # .h and .cc, and the C symbol
CARD, CARD_MARKDOWN, PROFILE = "model_card.json", "model_card.md", "profile.json"
VALIDATION_SCORES = "validation_scores.npz"  # each runtime's outputs on the validation slices
# The result folders of the other commands, also written through new_folder: predict (worklist),
# evaluate (metrics, per-slice predictions, plots, report), sweep (results tables), audit.
WORKLIST, SLICES, ERRORS, HEATMAPS = "worklist", "slices.csv", "errors.txt", "heatmaps"
# ... and with `--engine ray`, the same tables as Parquet, and each finished unit's scores as a part
SLICES_PARQUET, WORKLIST_PARQUET, PREDICT_PARTS = "slices.parquet", "worklist.parquet", ".predict-parts"
FEATURE_CACHE = ".feature-cache"  # `train --engine ray`: frozen features by configuration and pixels
SLICE_PREDICTIONS, RESULTS = "predictions.csv", "results"
NEAR_DUPLICATES, AUDIT = "near_duplicates.csv", "audit.json"
# feedback export (a manifest folder, as CT-ICH's), and the gated retrain's comparison.
FEEDBACK_LABELS, FEEDBACK_README = "labels.csv", "README.md"
COMPARISON, COMPARISON_REPORT = "comparison.json", "comparison.md"


# --- writing ---------------------------------------------------------------------------------


class Staging:
    """What :func:`new_folder` yields: ``tmp`` to write into; ``path``, the final folder, after it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.path: Path | None = None


def _claim(final: Path, tmp: Path) -> Path:
    """Rename ``tmp`` to ``final``, or to the next free ``final-N``: never over an existing folder."""
    target, n = final, 1
    while True:
        try:
            target.mkdir()  # claims the name atomically; the rename then replaces the empty folder
        except FileExistsError:
            n += 1
            target = final.with_name(f"{final.name}-{n}")
            continue
        os.rename(tmp, target)
        return target


@contextmanager
def new_folder(root: str | Path, name: str, stamp: bool = True, keep_failed: bool = False) -> Iterator[Staging]:
    """Write a new folder ``root/[TIMESTAMP-]name`` atomically: renamed into place when the block
    succeeds, removed when it fails, so no half-written folder is seen and nothing is overwritten.

    ``keep_failed`` keeps what a failed block wrote, renamed ``...-incomplete`` (an interrupted
    sweep of an hour is still worth reading).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / (f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{name}" if stamp else name)
    staging = Staging(Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root)))
    try:
        yield staging
    except BaseException:
        if keep_failed:
            staging.path = _claim(final.with_name(final.name + "-incomplete"), staging.tmp)
            log.error("stopped early; finished runs kept in %s", staging.path)
        else:
            shutil.rmtree(staging.tmp, ignore_errors=True)
        raise
    staging.path = _claim(final, staging.tmp)


class RunWriter:
    """Writes the files of a run folder into ``folder`` (a :class:`Staging` folder)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / PLOTS).mkdir(parents=True, exist_ok=True)

    def config(self, meta: dict) -> None:
        write_json(self.folder / CONFIG, {"layout": LAYOUT_VERSION, **meta})

    def model(self, model) -> None:  # a keras.Model; saving needs no import of Keras here
        model.save(self.folder / MODEL)

    def history(self, history: Mapping[str, list]) -> None:
        keys = [k for k in history if k != "phase"]
        with (self.folder / HISTORY).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["epoch", "phase", *keys])
            for i, phase in enumerate(history["phase"]):
                w.writerow([i + 1, phase, *(f"{history[k][i]:.6f}" for k in keys)])

    def metrics(self, metrics: dict) -> None:
        write_json(self.folder / METRICS, metrics)

    def context(self, context: SliceContext) -> None:
        write_json(self.folder / CONTEXT, context.to_json())

    def reference(self, reference: dict) -> None:
        write_json(self.folder / REFERENCE, reference)

    def predictions(self, probabilities: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> None:
        np.savez(self.folder / PREDICTIONS, **{f"{k}_p": v for k, v in probabilities.items()},
                 **{f"{k}_y": v for k, v in labels.items()})

    def plot(self, name: str) -> Path:
        return self.folder / PLOTS / f"{name}.png"


def write_json(path: Path, data: object, default=None) -> None:
    """``data`` as indented JSON; ``default`` as json.dumps takes it (None: unknown types raise)."""
    path.write_text(json.dumps(data, indent=2, default=default))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None


# --- reading ---------------------------------------------------------------------------------


def _upgrade_v1(meta: dict) -> dict:
    """Layout 1 (no ``layout`` key): runs from before heads, trimming and slice context."""
    config = dict(meta["config"])
    for key, default in (("head", "paper"), ("trim", False), ("context", False)):
        config.setdefault(key, default)
    return {**meta, "config": config, "layout": 2}


UPGRADES = {1: _upgrade_v1}


@dataclass(frozen=True)
class RunFolder:
    """A training run folder, opened: its ``config.json`` (upgraded to this layout) and its files."""

    path: Path
    meta: dict

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise DataError(f"{path}: not a run folder (no {CONFIG})")
        meta = _read_json(path / CONFIG)
        layout = meta.get("layout", 1)
        if not isinstance(layout, int) or not 1 <= layout <= LAYOUT_VERSION:
            raise DataError(f"{path}: run folder layout {layout} (ichedge {meta.get('ichedge_version', '?')}); "
                            f"this ichedge reads up to layout {LAYOUT_VERSION}: upgrade ichedge")
        while layout < LAYOUT_VERSION:
            meta = UPGRADES[layout](meta)
            layout = meta["layout"]
        missing = [k for k in ("config", "preprocessing", "dataset", "split") if k not in meta]
        if missing:
            raise DataError(f"{path / CONFIG}: missing {', '.join(missing)}")
        return cls(path, meta)

    @classmethod
    def of_model(cls, model: str | Path) -> RunFolder | None:
        """The run a model came from: a run folder, its model.keras, or a .tflite in one of its exports."""
        model = Path(model)
        for candidate in (model, model.parent, model.parent.parent):
            if candidate.is_dir() and (candidate / CONFIG).is_file() and (candidate / MODEL).is_file():
                return cls.open(candidate)
        return None

    @property
    def config(self) -> dict:
        return self.meta["config"]

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_json(self.meta["preprocessing"])

    @property
    def model_file(self) -> Path:
        path = self.path / MODEL
        if not path.is_file():
            raise DataError(f"{self.path}: no {MODEL} in this run folder")
        return path

    @property
    def has_metrics(self) -> bool:
        return (self.path / METRICS).is_file()

    def metrics(self) -> dict:
        if not self.has_metrics:
            raise DataError(f"{self.path}: no {METRICS}, so the model's validated thresholds are unknown")
        return _read_json(self.path / METRICS)

    def context_model(self) -> SliceContext | None:
        """The slice-context stage this run fitted, or None."""
        path = self.path / CONTEXT
        if not path.is_file():
            return None
        try:
            return SliceContext.from_json(_read_json(path))
        except ValueError as exc:
            raise DataError(f"{path}: unusable ({exc})") from None

    def input_reference(self) -> dict | None:
        """The training inputs' statistics (:class:`ichedge.quality.InputReference` JSON); None for older runs."""
        path = self.path / REFERENCE
        return _read_json(path) if path.is_file() else None

    def predictions(self) -> dict[str, np.ndarray]:
        with np.load(self.path / PREDICTIONS) as data:
            return dict(data)

    def split_keys(self, *parts: str) -> set[str]:
        """Record keys of the named parts of the split this run was trained on."""
        return {k for part in parts for k in self.meta["split"][part]}

    def seen_origins(self) -> set[str]:
        """:attr:`~ichedge.data.Dataset.origins` of the records this run trained or was validated
        on (its patients, where known), reread from the run's data."""
        info = self.meta["dataset"]
        ds = read_dataset(info["source"], tuple(info["windows"]))
        keys = self.split_keys("train", "val")
        return {o for r, o in zip(ds.records, ds.origins) if r.key in keys or str(r.path) in keys}

    def split_part(self, part: str) -> tuple[Loaded, np.ndarray | None, np.ndarray | None]:
        """Reload one part (train/val/test) of this run's split: inputs, each one's patient (None
        without patient IDs) and slice number (None where unknown)."""
        info = self.meta["dataset"]
        ds = read_dataset(info["source"], tuple(info["windows"]))
        position = {r.key: i for i, r in enumerate(ds.records)}
        wanted = self.meta["split"][part]
        missing = [k for k in wanted if k not in position]
        if missing:
            raise DataError(f"{info['source']}: {len(missing)} image(s) of the run's {part} split are gone, "
                            f"e.g. {missing[0]}")
        loaded = load_inputs(ds, self.preprocessing, [position[k] for k in wanted])
        return loaded, patient_groups(ds, loaded), slice_order(ds, loaded)

    def exports(self) -> list[ExportFolder]:
        """Complete exports, oldest first."""
        found = [ExportFolder(p) for p in self.path.glob(f"{EXPORT}*") if (p / EXPORT_MODELS["int8"]).is_file()]
        return sorted(found, key=lambda e: e.path.stat().st_mtime)

    def export(self, path: str | Path | None = None) -> ExportFolder:
        """The export at ``path``, or this run's latest when none is given."""
        return ExportFolder(Path(path)) if path else self.latest_export()

    def latest_export(self) -> ExportFolder:
        exports = self.exports()
        if not exports:
            raise DataError(f"{self.path}: no export yet; run `ichedge export {self.path}` first")
        return exports[-1]

    @property
    def site_profiles(self) -> Path:
        return self.path / SITE_PROFILES

    def _site_profile_files(self) -> dict[str, list[Path]]:
        """Each site's profile files, oldest first (by the UTC stamp in their names)."""
        found: dict[str, list[tuple[str, int, Path]]] = {}
        for path in self.site_profiles.glob("*"):
            m = _SITE_PROFILE.fullmatch(path.name)
            if m:
                found.setdefault(m["site"], []).append((m["stamp"], int(m["n"] or 1), path))
        return {site: [p for *_, p in sorted(files)] for site, files in found.items()}

    def site_profile(self, site: str) -> dict:
        """The newest profile of ``site``; an unknown site is an error listing the known ones."""
        files = self._site_profile_files()
        if site not in files:
            known = ", ".join(sorted(files)) or "none yet (run `ichedge calibrate`)"
            raise DataError(f"{self.path}: no site profile {site!r}; known sites: {known}")
        return _read_json(files[site][-1])

    def write_site_profile(self, site: str, profile: dict) -> Path:
        """A new profile file of ``site``, written whole under a temporary name and linked into
        place, so no half-written profile is read and no earlier calibration is overwritten."""
        check_site_name(site)
        self.site_profiles.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime(SITE_STAMP)
        handle, tmp = tempfile.mkstemp(prefix=f".{site}.", dir=self.site_profiles)
        try:
            with os.fdopen(handle, "w") as fh:
                json.dump(profile, fh, indent=2)
            n = 1
            while True:
                target = self.site_profiles / f"{site}-{stamp}{f'-{n}' if n > 1 else ''}.json"
                try:
                    os.link(tmp, target)  # fails rather than replace an existing file
                    return target
                except FileExistsError:
                    n += 1
        finally:
            os.unlink(tmp)


def check_site_name(site: str) -> str:
    """``site`` if it can name profile files: letters, digits, '-' and '_', up to 64."""
    if not SITE_NAME.fullmatch(site):
        raise DataError(f"site name {site!r}: use letters, digits, '-' and '_' (up to 64, starting with a "
                        "letter or digit)")
    return site


def validation_scores(model: str | Path, runtime: str | None = None) -> list[float] | None:
    """A model's own outputs on its run's validation slices (the monitor's baseline), if recorded:
    for an exported .tflite, its export's record of ``runtime`` (by default the file's own:
    int8 or float32, LiteRT's default kernels); for a Keras model, the run's predictions."""
    model = Path(model)
    if model.suffix == ".tflite":
        runtime = runtime or next((k for k, name in EXPORT_MODELS.items() if name == model.name), None)
        scores = ExportFolder.of_model(model).validation_scores(runtime) if runtime else None
        return None if scores is None else scores.reshape(-1).tolist()
    run = RunFolder.of_model(model)
    if run is None or not (run.path / PREDICTIONS).is_file():
        return None
    return run.predictions()["val_p"].reshape(-1).tolist()


def keras_model_file(path: str | Path) -> Path:
    """The Keras model behind a run folder, a ``.keras`` file, or a .tflite exported from a run."""
    path = Path(path)
    if path.suffix == ".keras":
        if not path.is_file():
            raise DataError(f"{path}: model file not found")
        return path
    run = RunFolder.of_model(path)
    if run is None:
        raise DataError(f"{path}: no Keras model found beside it (Grad-CAM needs the run folder's {MODEL})")
    return run.model_file


@contextmanager
def new_export(run: RunFolder) -> Iterator[ExportWriter]:
    """Write ``RUN/export`` (or ``export-N`` if taken) atomically; never over an earlier export."""
    with new_folder(run.path, EXPORT, stamp=False) as staging:
        writer = ExportWriter(staging.tmp)
        yield writer
    writer.folder = staging.path


class ExportWriter:
    """The files of an export folder being written; ``folder`` is the final one afterwards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def model_file(self, runtime: str) -> Path:
        return self.folder / EXPORT_MODELS[runtime]

    @property
    def c_files(self) -> tuple[Path, Path]:
        return self.folder / f"{C_ARRAY}.h", self.folder / f"{C_ARRAY}.cc"

    def validation_scores(self, scores: Mapping[str, np.ndarray]) -> None:
        np.savez(self.folder / VALIDATION_SCORES, **scores)

    def card(self, card: dict, markdown: str) -> dict:
        """Write the card (with its layout version) and its Markdown; returns the card as written."""
        card = {"layout": LAYOUT_VERSION, **card}
        write_json(self.folder / CARD, card)
        (self.folder / CARD_MARKDOWN).write_text(markdown)
        return card


@dataclass(frozen=True)
class ExportFolder:
    """An export of a run: LiteRT models, C array, model card and, once profiled, the profile."""

    path: Path

    @classmethod
    def of_model(cls, tflite: str | Path) -> ExportFolder:
        return cls(Path(tflite).parent)

    def model_file(self, runtime: str) -> Path:
        return self.path / EXPORT_MODELS[runtime]

    def validation_scores(self, runtime: str) -> np.ndarray | None:
        """A runtime's outputs on the run's validation slices; None for exports older than this record."""
        path = self.path / VALIDATION_SCORES
        if not path.is_file():
            return None
        with np.load(path) as data:
            return data[runtime] if runtime in data else None

    def card(self) -> dict:
        path = self.path / CARD
        if not path.is_file():
            raise DataError(f"{self.path}: no {CARD}, so the model's preprocessing and thresholds are unknown")
        card = _read_json(path)
        if not isinstance(card.get("layout", 1), int) or card.get("layout", 1) > LAYOUT_VERSION:
            raise DataError(f"{path}: layout {card['layout']}; this ichedge reads up to {LAYOUT_VERSION}: "
                            "upgrade ichedge")
        return card

    @property
    def has_card(self) -> bool:
        return (self.path / CARD).is_file()

    @property
    def card_markdown(self) -> Path:
        return self.path / CARD_MARKDOWN

    def write_profile(self, profile: dict) -> Path:
        path = self.path / PROFILE
        write_json(path, profile)
        return path

    @property
    def profile_file(self) -> Path:
        return self.path / PROFILE
