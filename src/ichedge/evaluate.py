"""`ichedge evaluate`: a trained or exported model on any dataset, without retraining.

:func:`score_model` loads the model and the data, predicts and hands the numbers to the pure
core (:func:`ichedge.evaluation.evaluate`); :func:`write_evaluation` writes what it returned
(metrics, per-slice predictions, plots, an HTML report) into a new folder. Thresholds are the
model's own, never re-chosen on the data evaluated. Slices the model was trained or validated
on are counted and said loudly; ``unseen_only`` leaves them out instead.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from ichedge.data import DataError, Dataset, read_dataset
from ichedge.evaluation import Evaluation, evaluate
from ichedge.plots import plot_confusion, plot_pr, plot_reliability, plot_roc
from ichedge.preprocess import Loaded, load_inputs, patient_groups, slice_order
from ichedge.quality import REFUSED
from ichedge.report import Report, interval, metric_rows, source_tables
from ichedge.localisation import localise, prepared_mask
from ichedge.runs import (
    CARD_MARKDOWN, METRICS, PLOTS, REPORT, SLICE_PREDICTIONS, RunFolder, keras_model_file, new_folder, write_json,
)
from ichedge.runtimes import KerasPredictor, Predictor

log = logging.getLogger(__name__)


@dataclass
class ModelEvaluation:
    """An :class:`~ichedge.evaluation.Evaluation` with what it was computed from, and its warnings."""

    evaluation: Evaluation
    model: Path
    predictor: Predictor
    dataset: Dataset
    inputs: Loaded
    seen: int  # slices of the model's own training or validation patients among those scored
    banners: list[str]
    input_check: dict  # the quality gate's refusals and the OOD flags, as the triage would give them
    ood: np.ndarray | None = None  # each scored slice's input OOD score; None without a reference
    localisation: dict | None = None  # Grad-CAM against the masks of positive slices, where the data has masks

    @property
    def summary(self) -> dict:
        decision = self.predictor.decision
        out = {"model": str(self.model), "kind": self.predictor.kind, "dataset": self.dataset.summary(),
               "source": str(self.dataset.source), "slices_seen_in_training": self.seen,
               "skipped_images": self.inputs.errors, "decision": decision.to_json(), "input_check": self.input_check}
        if self.evaluation.notes:
            out["context_note"] = "; ".join(self.evaluation.notes)
        if self.localisation is not None:
            out["localisation"] = {k: v for k, v in self.localisation.items() if k not in ("index", "per_slice")}
        return out


def score_model(model: str | Path, data: str | Path | Sequence[str | Path] | None, progress: bool = False, n_boot: int = 2000,
                unseen_only: bool = False, localise_masks: bool = True) -> ModelEvaluation:
    """Load ``model`` and ``data``, score every readable slice and evaluate at the model's thresholds.
    Where positive slices have segmentation masks, ``localise_masks`` also measures whether the
    model's Grad-CAM points at them (:mod:`ichedge.localisation`)."""
    model = Path(model)
    predictor = Predictor.load(model)
    decision = predictor.decision
    if decision is None:
        raise DataError(f"{model}: no validated thresholds recorded with this model")
    ds = read_dataset(data, predictor.preprocessing.windows)
    run = RunFolder.of_model(model)
    banners = []
    try:
        used = run.seen_origins() if run is not None else set()
    except DataError as exc:  # the run's data moved: say so rather than guess
        used = set()
        banners.append(f"Could not check which patients this model was trained on ({exc}).")
    origins = ds.origins
    wanted = [i for i in range(len(ds)) if not (unseen_only and origins[i] in used)]
    inputs = load_inputs(ds, predictor.preprocessing, wanted, progress=progress, check=True)
    if len(inputs.y) == 0:
        raise DataError(f"{ds.name}: no readable image" + (" the model has not seen" if unseen_only else ""))
    ev = evaluate(inputs.y, predictor.predict(inputs.x), decision, patient_groups(ds, inputs), slice_order(ds, inputs),
                  n_boot, ds.record_sources[inputs.indices])
    seen = sum(origins[i] in used for i in inputs.indices)
    if seen:
        banners.append(f"{seen} of {len(inputs.y)} slices belong to this model's training or validation patients: "
                       "these numbers are inflated; evaluate with --unseen-only (the run's test patients) or on "
                       "other data.")
    if not ds.has_patients:
        banners.append("No patient IDs: intervals resample images, so they are too narrow, and any near-duplicate "
                       "slices of training patients inflate the result (run `ichedge audit`).")
    ood = predictor.reference.score(inputs.x) if predictor.reference is not None else None
    check = input_check(inputs, ood, ds.record_sources[inputs.indices])
    if check["refused"]:
        banners.append(f"{check['refused']} slice(s) refused by the quality gate (not a usable head-CT slice), as "
                       "the triage would refuse them: left out of every figure (listed under skipped_images).")
    if check.get("outside"):
        banners.append(f"{check['outside']} of {len(inputs.y)} slices are outside what this model was validated on "
                       "(input OOD score >= 1): scored and counted here, flagged in triage.")
    found = _localisation(model, ds, inputs, predictor, banners) if localise_masks else None
    return ModelEvaluation(ev, model, predictor, ds, inputs, seen, banners, check, ood, found)


def input_check(inputs: Loaded, ood: np.ndarray | None, sources: np.ndarray) -> dict:
    """How many slices the gate refused (by reason) and how many scored ones are OOD, overall and per source."""
    reasons: dict[str, int] = {}
    for e in inputs.errors:
        if REFUSED in e:
            reason = e.split(REFUSED + ": ", 1)[1].split(" (")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    out: dict = {"refused": sum(reasons.values()), "refused_by_reason": reasons, "scored": len(inputs.y)}
    if ood is None:
        out["ood"] = "no input reference recorded with this model"
        return out
    out["outside"] = int((ood >= 1).sum())
    names = sorted(set(sources.tolist()))
    if len(names) > 1:
        out["outside_by_source"] = {n: {"outside": int((ood[sources == n] >= 1).sum()), "scored": int((sources == n).sum())}
                                    for n in names}
    return out


def _localisation(model: Path, ds: Dataset, inputs: Loaded, predictor: Predictor, banners: list[str]) -> dict | None:
    """Grad-CAM against the masks of the positive slices that have one; None where none has."""
    rows, masks = [], []
    for j, i in enumerate(inputs.indices):
        record = ds.records[i]
        if record.label == 1 and record.mask is not None:
            try:
                masks.append(prepared_mask(record, predictor.preprocessing))
                rows.append(j)
            except DataError as exc:
                log.warning("mask left out: %s", exc)
    if not rows:
        return None
    try:  # Grad-CAM needs the Keras model: the one scoring already, or the one behind an export
        keras_model = predictor.model if isinstance(predictor, KerasPredictor) else \
            keras.models.load_model(keras_model_file(model))
    except DataError as exc:
        banners.append(f"Masks found but no Grad-CAM localisation measured: {exc}")
        return None
    groups = patient_groups(ds, inputs)
    return localise(keras_model, inputs.x[rows], np.stack(masks), None if groups is None else groups[rows])


def write_evaluation(out_root: str | Path, me: ModelEvaluation) -> Path:
    """A new folder under ``out_root``: metrics.json, predictions.csv, plots/, report.html."""
    ev, ds, decision = me.evaluation, me.dataset, me.predictor.decision
    y, p, metrics = ev.y, ev.p, ev.metrics
    with new_folder(out_root, "evaluate") as folder:
        plots = folder.tmp / PLOTS
        plots.mkdir()
        points = {"0.5": metrics["default"], "high-sensitivity": metrics["high_sensitivity"]}
        if len(set(y.tolist())) == 2:
            plot_roc(y, p, points, plots / "roc.png")
            plot_pr(y, p, points, plots / "precision_recall.png")
        plot_reliability(y, p, plots / "reliability.png")
        plot_confusion(metrics["high_sensitivity"], plots / "confusion_high_sensitivity.png",
                       f"threshold {decision.slice_threshold:.3f} (the model's validated one)")
        write_json(folder.tmp / METRICS, {**me.summary, **metrics}, default=str)
        with (folder.tmp / SLICE_PREDICTIONS).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "patient", "label", "probability", "ood_score"])
            ood = me.ood if me.ood is not None else np.full(len(p), np.nan)
            for i, label, prob, o in zip(me.inputs.indices, y, p, ood):
                r = ds.records[i]
                w.writerow([r.path, r.patient or "", int(label), f"{prob:.6f}", "" if np.isnan(o) else f"{o:.4f}"])
        report = Report(f"Evaluation of {me.model.name} on {ds.name}", banners=me.banners)
        report.paragraph(f"{ds.summary()}. Model: {me.predictor.kind}, thresholds as validated at training "
                         f"(slice {decision.slice_threshold:.3f}; study: {decision.study_aggregate} of slices >= "
                         f"{decision.study_threshold:.3f}). 95% intervals resample {metrics['intervals']['resampled']}.")
        report.table(metric_rows(metrics))
        source_tables(report, metrics)
        report.paragraph(f"Calibration: ECE {metrics['calibration']['ece']:.3f}.")
        if me.localisation is not None:
            loc = me.localisation
            report.heading("Grad-CAM against the masks")
            report.paragraph(f"{loc['n_slices']} positive slices with a mask. Pointing game: the heatmap's peak in the "
                             f"filled mask (exactly, and within {loc['tolerance']:g} pixels); mass: the heatmap's share "
                             "inside the mask, against the mask's share of the frame (chance). 95% intervals resample "
                             f"{loc['resampled']}.")
            report.table([{"measure": k, "value": interval(v)} for k, v in loc["summary"].items()])
        report.plots(sorted(plots.glob("*.png")))
        report.code(me.summary)
        card = me.predictor.source.parent / CARD_MARKDOWN
        if card.is_file():
            report.link("model card", card.resolve().as_uri())
        report.write(folder.tmp / REPORT, ds.credit)
    return folder.path


def evaluate_model(model: str | Path, data: str | Path | Sequence[str | Path] | None, out_root: str | Path = Path("runs"),
                   progress: bool = False, n_boot: int = 2000, unseen_only: bool = False,
                   localise_masks: bool = True) -> tuple[Path, dict]:
    """:func:`score_model`, then :func:`write_evaluation`; returns the folder and its metrics.json content."""
    me = score_model(model, data, progress, n_boot, unseen_only, localise_masks)
    return write_evaluation(out_root, me), {**me.summary, **me.evaluation.metrics}
