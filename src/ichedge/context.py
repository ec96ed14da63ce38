"""Slice context: re-score each slice with what its neighbours and its study say.

A radiologist does not read a slice alone: a bleed spans adjacent 5 mm slices, a scan with one
obvious bleed makes a faint one elsewhere more likely, and a skull-base slice full of bone
artefacts is less suspicious than a mid-brain one. This stage takes the slice model's
probabilities over an ordered study and re-scores each slice from :data:`FEATURES`: its own
logit, the logits of the slices one and two below and above, the larger of its two direct
neighbours, the study's top-3 mean and mean logits, and its relative position in the study
(and that squared). A balanced logistic regression combines them: ten weights and a bias, a few
lines of C after the network on a device that keeps a study's slice scores.

It must be fitted on *out-of-fold* slice probabilities (:func:`ichedge.training.fit` refits
the head on inner patient folds of the training split), never on probabilities the head was
trained on, or it learns to trust slice scores more than unseen patients deserve.

A study stage declares what it needs (:attr:`SliceContext.needs`), fits on slice scores,
applies to them, and serialises to JSON; stages register in :data:`STAGES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ichedge.registry import Registry

STAGES: Registry[type] = Registry("study stage")

FEATURES = ("logit", "logit_below", "logit_above", "logit_below2", "logit_above2", "logit_adjacent_max",
            "study_top3", "study_mean", "position", "position_squared")
_EPS = 1e-6


def context_features(probs: np.ndarray, groups: Sequence, order: Sequence[float]) -> np.ndarray:
    """The :data:`FEATURES` of every slice: one row per slice, in the input's order.

    ``groups`` names each slice's study (patient or series); ``order`` is its position along
    the scan (slice number or position on the slice normal). A study's ends repeat the end
    slice for the missing neighbours; a one-slice study sits at position 0.5.
    """
    p = np.asarray(probs, dtype=np.float64)
    groups, order = np.asarray(groups), np.asarray(order, dtype=np.float64)
    if not (len(p) == len(groups) == len(order)):
        raise ValueError(f"probabilities ({len(p)}), groups ({len(groups)}) and order ({len(order)}) differ in length")
    if not (np.isfinite(p).all() and np.isfinite(order).all()):
        raise ValueError("slice context needs finite probabilities and slice positions (got NaN or infinity)")
    p = np.clip(p, _EPS, 1 - _EPS)
    logit = np.log(p / (1 - p))
    out = np.zeros((len(logit), len(FEATURES)))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[np.argsort(order[idx], kind="stable")]
        s = logit[idx]
        n = len(s)
        shifted = lambda k: s[np.clip(np.arange(n) + k, 0, n - 1)]  # noqa: E731
        pos = np.arange(n) / (n - 1) if n > 1 else np.full(n, 0.5)
        out[idx] = np.column_stack([
            s, shifted(-1), shifted(1), shifted(-2), shifted(2), np.maximum(shifted(-1), shifted(1)),
            np.full(n, np.sort(s)[::-1][:3].mean()), np.full(n, s.mean()), pos, pos ** 2,
        ])
    return out


@STAGES.register("context")
@dataclass(frozen=True)
class SliceContext:
    """A fitted context model: standardisation and logistic-regression weights over :data:`FEATURES`.

    Interface of a study stage: ``fit(probs, y, groups, order)`` on out-of-fold slice
    probabilities, ``apply(probs, groups, order)`` -> re-scored probabilities, ``to_json`` /
    ``from_json``; it needs each slice's study (``groups``) and position in it (``order``).
    """

    name: ClassVar[str] = "context"
    needs: ClassVar[frozenset[str]] = frozenset({"patients", "slice_order"})

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    features: tuple[str, ...] = FEATURES

    @classmethod
    def fit(cls, probs: np.ndarray, y: np.ndarray, groups: Sequence, order: Sequence[float], c: float = 1.0) -> SliceContext:
        """Fit on out-of-fold slice probabilities of the training studies (balanced classes)."""
        z = context_features(probs, groups, order)
        scaler = StandardScaler().fit(z)
        lr = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(scaler.transform(z), y)
        return cls(tuple(scaler.mean_), tuple(scaler.scale_), tuple(lr.coef_[0]), float(lr.intercept_[0]))

    def apply(self, probs: np.ndarray, groups: Sequence, order: Sequence[float]) -> np.ndarray:
        """Context probabilities of the slices (same order as given)."""
        z = (context_features(probs, groups, order) - np.array(self.mean)) / np.array(self.scale)
        return 1 / (1 + np.exp(-(z @ np.array(self.coef) + self.intercept)))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SliceContext:
        if tuple(data.get("features", ())) != FEATURES:
            raise ValueError(f"context model features {data.get('features')} are not this version's {list(FEATURES)}")
        try:
            model = cls(tuple(map(float, data["mean"])), tuple(map(float, data["scale"])),
                        tuple(map(float, data["coef"])), float(data["intercept"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"context model incomplete or malformed ({type(exc).__name__}: {exc})") from None
        if not len(model.mean) == len(model.scale) == len(model.coef) == len(FEATURES):
            raise ValueError(f"context model needs {len(FEATURES)} means, scales and weights")
        return model
