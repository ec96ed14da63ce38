"""From slice probabilities to study scores, study decisions and an urgency-ordered worklist.

A clinician triages studies, not slices. A study's score is an aggregate of its slices'
probabilities; :data:`DEFAULT_AGGREGATE` was picked by measurement on CT-ICH's patient-level
folds (README, "Study-level triage").
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

AGGREGATES = ("max", "top2", "top3", "top5", "mean")
DEFAULT_AGGREGATE = "top3"


def study_score(probabilities: Sequence[float], method: str = DEFAULT_AGGREGATE) -> float:
    """One score per study: the maximum, the mean of the top k slices, or the mean of all."""
    p = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    if p.size == 0:
        raise ValueError("a study needs at least one slice")
    if method == "max":
        return float(p[0])
    if method == "mean":
        return float(p.mean())
    if method.startswith("top") and method[3:].isdigit() and int(method[3:]) > 0:
        return float(p[: int(method[3:])].mean())
    raise ValueError(f"unknown study aggregate {method!r}; choose one of {AGGREGATES} (or topK)")


def group_scores(
    groups: Sequence[str], probabilities: Sequence[float], method: str = DEFAULT_AGGREGATE
) -> dict[str, float]:
    """Score of each group (study or patient) from the probabilities of its slices."""
    by: dict[str, list[float]] = {}
    for g, p in zip(groups, probabilities):
        by.setdefault(str(g), []).append(float(p))
    return {g: study_score(ps, method) for g, ps in by.items()}


def group_labels(groups: Sequence[str], labels: Sequence[int]) -> dict[str, int]:
    """A study is positive when any of its slices is."""
    out: dict[str, int] = {}
    for g, y in zip(groups, labels):
        out[str(g)] = max(out.get(str(g), 0), int(y))
    return out


def study_decision(config: dict, metrics: dict) -> dict:
    """How slices add up to a study decision. Runs from before study metrics flag a study when
    any slice is flagged (maximum at the slice threshold)."""
    if "study_high_sensitivity" in metrics:
        return {"study_aggregate": config["study_aggregate"], "study": metrics["study_high_sensitivity"]["threshold"]}
    return {"study_aggregate": "max", "study": metrics["high_sensitivity"]["threshold"]}


def study_arrays(
    groups: Sequence[str], labels: Sequence[int], probabilities: Sequence[float], method: str = DEFAULT_AGGREGATE
) -> tuple[np.ndarray, np.ndarray]:
    """Per study (sorted by name): its label (any slice positive) and its score (``method``)."""
    scores, truth = group_scores(groups, probabilities, method), group_labels(groups, labels)
    keys = sorted(scores)
    return np.array([truth[k] for k in keys]), np.array([scores[k] for k in keys])


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


@dataclass
class StudyResult:
    """A study (DICOM series, or a folder of images) on the worklist."""

    study: str
    slices: int
    score: float
    flagged: bool
    top_slices: list[int] = field(default_factory=list)  # indices, most suspicious first


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
        studies.append(StudyResult(study, len(members), score, score >= threshold, [s.index for s in ranked[:5]]))
    return sorted(studies, key=lambda s: (not s.flagged, -s.score, s.study))


def write_worklist(folder: Path, slices: Sequence[SliceResult], studies: Sequence[StudyResult], meta: dict) -> None:
    """``slices.csv``, ``worklist.csv`` and ``worklist.json`` (everything, with ``meta``) in ``folder``."""
    with (folder / "slices.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(SliceResult.__dataclass_fields__))
        w.writeheader()
        for s in slices:
            w.writerow({**asdict(s), "probability": f"{s.probability:.6f}"})
    with (folder / "worklist.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "study", "slices", "score", "flagged", "top_slices"])
        for rank, s in enumerate(studies, 1):
            w.writerow([rank, s.study, s.slices, f"{s.score:.6f}", s.flagged, " ".join(map(str, s.top_slices))])
    doc = {**meta, "worklist": [asdict(s) for s in studies], "slices": [asdict(s) for s in slices]}
    (folder / "worklist.json").write_text(json.dumps(doc, indent=2))
