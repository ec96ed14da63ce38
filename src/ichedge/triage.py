"""From slice probabilities to an urgency-ordered worklist: the triage flow and its writer.

:func:`triage` scores prepared slices (:mod:`ichedge.intake`) with any
:class:`~ichedge.runtimes.Predictor` at the model's validated thresholds, optionally through
its slice-context stage, aggregates studies (:mod:`ichedge.studies`) and explains flagged
slices with Grad-CAM; :func:`write_triage` writes the worklist folder.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ichedge.access import study_hash
from ichedge.data import DataError
from ichedge.explain import GradCAM, save_overlay
from ichedge.intake import Prepared
from ichedge.runs import (ERRORS, HEATMAPS, SLICES, SLICES_PARQUET, WORKLIST, WORKLIST_PARQUET, keras_model_file,
                          new_folder, validation_scores, write_json)
from ichedge.runtimes import Predictor
from ichedge.store import SliceRecord, Store, StudyRecord, model_id
from ichedge.studies import DEFAULT_AGGREGATE, study_score

log = logging.getLogger(__name__)

EXPLAIN_CHOICES = ("none", "flagged", "all")


@dataclass
class SliceResult:
    """One input slice: where it came from and what the model said."""

    file: str
    study: str
    index: int  # position in the study after ordering
    probability: float  # what the decision used: the network's output, or its slice-context score
    flagged: bool
    heatmap: str | None = None
    network_probability: float | None = None  # the network's own output, where context re-scored it
    ood_score: float | None = None  # input OOD score (1 = the boundary); None without a reference
    outside: bool = False  # outside what this model was validated on: its score is not to be trusted


@dataclass
class StudyResult:
    """A study (DICOM series, or a folder of images) on the worklist."""

    study: str
    slices: int
    score: float
    flagged: bool
    top_slices: list[int] = field(default_factory=list)  # indices, most suspicious first
    outside_slices: int = 0  # slices outside what this model was validated on


def build_worklist(
    slices: Sequence[SliceResult], slice_threshold: float, method: str = DEFAULT_AGGREGATE,
    study_threshold: float | None = None,
) -> list[StudyResult]:
    """Studies ordered by urgency: flagged first, then by score, highest first.

    A study is flagged when its score reaches ``study_threshold``; without one, the slice
    threshold (with ``method="max"``: exactly when one of its slices is flagged).
    """
    threshold = slice_threshold if study_threshold is None else study_threshold
    by: dict[str, list[SliceResult]] = {}
    for s in slices:
        by.setdefault(s.study, []).append(s)
    studies = []
    for study, members in by.items():
        score = study_score([s.probability for s in members], method)
        ranked = sorted(members, key=lambda s: -s.probability)
        studies.append(StudyResult(study, len(members), score, score >= threshold, [s.index for s in ranked[:5]],
                                   sum(s.outside for s in members)))
    return sorted(studies, key=lambda s: (not s.flagged, -s.score, s.study))


def write_worklist(folder: Path, slices: Sequence[SliceResult], studies: Sequence[StudyResult], meta: dict) -> None:
    """``slices.csv``, ``worklist.csv`` and ``worklist.json`` (everything, with ``meta``) in ``folder``."""
    with (folder / SLICES).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(SliceResult.__dataclass_fields__))
        w.writeheader()
        for s in slices:
            w.writerow({**asdict(s), "probability": f"{s.probability:.6f}"})
    with (folder / f"{WORKLIST}.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "study", "slices", "score", "flagged", "top_slices", "outside_slices"])
        for rank, s in enumerate(studies, 1):
            w.writerow([rank, s.study, s.slices, f"{s.score:.6f}", s.flagged, " ".join(map(str, s.top_slices)),
                        s.outside_slices])
    doc = {**meta, "worklist": [asdict(s) for s in studies], "slices": [asdict(s) for s in slices]}
    write_json(folder / f"{WORKLIST}.json", doc)


@dataclass
class TriageResult:
    """Per-slice results, the worklist, every file that could not be used, and how it was scored."""

    slices: list[SliceResult]
    studies: list[StudyResult]
    errors: list[str]
    scoring: str  # "slice" or "slice context"
    slice_threshold: float
    study_threshold: float
    notes: list[str] = field(default_factory=list)  # cautions about the scores, e.g. unusual studies
    heatmaps: np.ndarray | None = None  # Grad-CAM per slice; rows not in `explained` are zeros
    explained: np.ndarray | None = None  # indices of the slices that have a heatmap


# Slice context was fitted on whole 5 mm head CTs (CT-ICH: 19 to 40 slices, 30 typical): with
# far fewer slices, or a thin-section series of hundreds, its neighbour and study features
# mean something else.
CONTEXT_STUDY_SLICES = (10, 60)

OUTSIDE = "outside what this model was validated on"


def _direct(model: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    return model(x)


@dataclass
class Scores:
    """What the network and the input reference said of prepared slices, without their pixels:
    what an engine sends back from its workers (:mod:`ichedge.scale`)."""

    files: list[str]
    studies: list[str]
    indices: list[int]
    network: np.ndarray
    ood: np.ndarray  # NaN without an input reference
    errors: list[str]
    digests: list[str] = field(default_factory=list)  # each file's SHA-256, where the engine read them

    @classmethod
    def concat(cls, parts: Sequence[Scores]) -> Scores:
        """Parts in the order given, as one."""
        return cls([f for p in parts for f in p.files], [s for p in parts for s in p.studies],
                   [i for p in parts for i in p.indices],
                   np.concatenate([p.network for p in parts]) if parts else np.zeros(0, np.float32),
                   np.concatenate([p.ood for p in parts]) if parts else np.zeros(0),
                   [e for p in parts for e in p.errors], [d for p in parts for d in p.digests])


def score(prepared: Prepared, predictor: Predictor, run: Callable = _direct) -> Scores:
    """The network's output and the input OOD score of each prepared slice."""
    network = run(predictor.predict, prepared.x)
    ood = predictor.reference.score(prepared.x) if predictor.reference is not None else np.full(len(network), np.nan)
    return Scores(list(prepared.files), list(prepared.studies), list(prepared.indices), network, ood,
                  list(prepared.errors))


def triage(prepared: Prepared, predictor: Predictor, explain: str = "none", explainer: GradCAM | None = None,
           context: bool = False, run: Callable = _direct) -> TriageResult:
    """Score slices, aggregate studies at the model's validated thresholds, optionally explain.

    With ``context`` and a model trained with slice context, each slice is re-scored from its
    study (neighbours, study scores, position) and the context thresholds apply to slices and
    studies; the network's own output is kept in ``SliceResult.network_probability``. Off by
    default: on CT-ICH it raised slice AUC but not study AUC (docs/accuracy.md, "Input size and slice
    context"). ``explain`` is 'none', 'flagged' (heatmaps of flagged slices) or 'all'; it needs
    ``explainer``, an :class:`ichedge.explain.GradCAM` of the model's Keras version. Each slice
    gets the input OOD score of the model's reference (:mod:`ichedge.quality`) where it has one.
    ``run(model, x)`` calls the network and the explainer (the service takes turns through it).
    """
    if explain not in EXPLAIN_CHOICES:
        raise ValueError(f"explain must be one of {EXPLAIN_CHOICES}")
    if explain != "none" and explainer is None:
        raise ValueError("explanations need a GradCAM of the Keras model")
    if predictor.decision is None:
        raise DataError(f"{predictor.source}: no validated thresholds recorded with this model")
    result = decide(score(prepared, predictor, run), predictor, context)
    if explain != "none":
        flagged = np.array([s.flagged for s in result.slices], bool)
        chosen = np.nonzero(flagged)[0] if explain == "flagged" else np.arange(len(flagged))
        result.heatmaps = np.zeros(prepared.x.shape[:3], np.float32)
        result.explained = chosen
        if len(chosen):
            result.heatmaps[chosen] = run(lambda batch: explainer(batch)[0], prepared.x[chosen])
    return result


def decide(scores: Scores, predictor: Predictor, context: bool = False) -> TriageResult:
    """Flags, slice results and the worklist from scores, at the model's validated thresholds
    (with ``context``, through its slice-context stage: see :func:`triage`)."""
    decision = predictor.decision
    if decision is None:
        raise DataError(f"{predictor.source}: no validated thresholds recorded with this model")
    network, ood = scores.network, scores.ood
    p, slice_t, study_t, scoring = network, decision.slice_threshold, decision.study_threshold, "slice"
    notes: list[str] = []
    if context and decision.site is not None:
        notes.append(f"site profile {decision.site!r} calibrated the network's own slice scores, not slice "
                     "context; slices scored alone")
    elif context and decision.context is None:
        notes.append(f"{predictor.source}: no slice-context stage in this model (train with --context); slices scored alone")
    if context and decision.context is not None and len(network):
        c = decision.context
        p = c.model.apply(network, scores.studies, scores.indices)
        slice_t, study_t, scoring = c.slice_threshold, c.study_threshold, "slice context"
        low, high = CONTEXT_STUDY_SLICES
        notes += [f"study {study} has {n} slice(s): slice context was fitted on whole 5 mm head CTs of about 30 "
                  "slices, so its scores here are less reliable"
                  for study, n in sorted(Counter(scores.studies).items()) if not low <= n <= high]
    if predictor.reference is None:
        notes.append("no input reference recorded with this model (trained before ichedge recorded one), so no "
                     "slice is checked against what it was validated on")
    elif (ood >= 1).any():
        notes.append(f"{int((ood >= 1).sum())} slice(s) {OUTSIDE} (input OOD score >= 1): do not trust their scores")
    for note in notes:
        log.warning("%s", note)
    flagged = p >= slice_t
    slices = [SliceResult(f, s, i, float(q), bool(fl), network_probability=float(n) if scoring != "slice" else None,
                          ood_score=None if np.isnan(o) else round(float(o), 4), outside=bool(o >= 1))
              for f, s, i, q, fl, n, o in zip(scores.files, scores.studies, scores.indices, p, flagged, network, ood)]
    studies = build_worklist(slices, slice_t, decision.study_aggregate, study_t)
    return TriageResult(slices, studies, list(scores.errors), scoring, slice_t, study_t, notes)


SLICE_HASH_CHARS = 20  # of a slice file's SHA-256: what the store and the kept copy's name use


def study_records(result: TriageResult, digests: dict[str, str], kept: dict[str, str] | None = None
                  ) -> dict[str, StudyRecord]:
    """What the store keeps of each study (by its name in ``result``): content hashes, scores, decisions.

    ``digests`` maps each slice's file name to its SHA-256; ``kept``, to its kept copy's name.
    A study is named by the hash of its slices' digests (:func:`ichedge.access.study_hash`), so
    the same files uploaded again are the same study, whatever they were called.
    """
    kept = kept or {}
    members: dict[str, list[SliceResult]] = {}
    for s in result.slices:
        members.setdefault(s.study, []).append(s)
    out = {}
    for st in result.studies:
        ordered = sorted(members[st.study], key=lambda s: s.index)
        out[st.study] = StudyRecord(
            study_hash([digests[s.file] for s in ordered]), st.score, st.flagged, st.outside_slices,
            [SliceRecord(digests[s.file][:SLICE_HASH_CHARS], s.index, s.probability, s.flagged, s.ood_score, s.outside,
                         kept.get(s.file)) for s in ordered])
    return out


def record_batch(store: Store, predictor: Predictor, result: TriageResult, digests: dict[str, str], *,
                 n_files: int, latency_ms: float) -> dict[str, int]:
    """Record a batch (``ichedge predict``) in the store as the service records a request."""
    d = predictor.decision
    model = model_id(predictor.source if predictor.source.is_file() else keras_model_file(predictor.source))
    store.register_model(model, predictor.source.name, predictor.kind, str(predictor.source), d.slice_threshold,
                         d.study_threshold, validation_scores(predictor.source))
    return store.record(channel="predict", status=200, model=model, n_files=n_files, latency_ms=latency_ms,
                        studies=study_records(result, digests).values(), slice_threshold=result.slice_threshold,
                        study_threshold=result.study_threshold, scoring=result.scoring, site=d.site)


def write_triage(out_root: Path, result: TriageResult, prepared: Prepared | None, predictor: Predictor,
                 parquet: bool = False) -> Path:
    """A new folder under ``out_root``: slices.csv, worklist.csv/.json, errors.txt, heatmaps/
    (``prepared`` gives their pixels), and with ``parquet`` slices.parquet and worklist.parquet."""
    with new_folder(out_root, "predict") as folder:
        if result.explained is not None:
            (folder.tmp / HEATMAPS).mkdir()
            for k in result.explained:
                s = result.slices[k]
                s.heatmap = f"{HEATMAPS}/{k:05d}_{safe_name(s.study)}_{s.index:04d}.png"  # k: unique
                save_overlay(folder.tmp / s.heatmap, prepared.x[k], result.heatmaps[k])
        d = predictor.decision
        meta = {"model": str(predictor.source), "kind": predictor.kind,
                "preprocessing": predictor.preprocessing.to_json(), "scoring": result.scoring,
                "slice_threshold": result.slice_threshold, "study_threshold": result.study_threshold,
                "study_aggregate": d.study_aggregate, "target_sensitivity": d.target_sensitivity,
                "site": d.site, "notes": result.notes, "errors": result.errors}
        write_worklist(folder.tmp, result.slices, result.studies, meta)
        if parquet:
            write_parquet(folder.tmp, result)
        (folder.tmp / ERRORS).write_text("".join(f"{e}\n" for e in result.errors))
    return folder.path


def write_parquet(folder: Path, result: TriageResult) -> None:
    """The slices and the ranked worklist as Parquet tables (pyarrow, of the ``scale`` extra)."""
    import pyarrow as pa  # optional: only archive-scale runs write Parquet
    import pyarrow.parquet as pq

    slices = {k: [getattr(s, k) for s in result.slices] for k in SliceResult.__dataclass_fields__}
    pq.write_table(pa.table(slices), folder / SLICES_PARQUET)
    studies = {"rank": list(range(1, len(result.studies) + 1)),
               **{k: [getattr(s, k) for s in result.studies] for k in StudyResult.__dataclass_fields__}}
    pq.write_table(pa.table(studies), folder / WORKLIST_PARQUET)


def safe_name(text: str) -> str:
    """A file-name-safe version of a study name (which may be a folder path)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_.")[-80:] or "study"
