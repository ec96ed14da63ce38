"""From slice probabilities to study scores: the aggregates a study-level decision uses.

A clinician triages studies, not slices. A study's score is an aggregate of its slices'
probabilities; :data:`DEFAULT_AGGREGATE` was picked by measurement on CT-ICH's patient-level
folds (docs/accuracy.md, "Channels, study-level triage and Grad-CAM").
"""

from __future__ import annotations

from collections.abc import Sequence

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


def study_arrays(
    groups: Sequence[str], labels: Sequence[int], probabilities: Sequence[float], method: str = DEFAULT_AGGREGATE
) -> tuple[np.ndarray, np.ndarray]:
    """Per study (sorted by name): its label (any slice positive) and its score (``method``)."""
    scores, truth = group_scores(groups, probabilities, method), group_labels(groups, labels)
    keys = sorted(scores)
    return np.array([truth[k] for k in keys]), np.array([scores[k] for k in keys])
