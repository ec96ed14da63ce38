"""Input size, feature layers and slice context: the frozen-feature ablations of issue 2
(an experiment, not a test).

On the full-resolution CT-ICH images (650x650 JPEGs, cropped to the head), with the 5 patient
folds `ichedge sweep --cv --data <labels.csv>` uses (seed 0): frozen ImageNet MobileNetV2
(alpha 0.35) features, a logistic regression (balanced, C=0.01) on the training patients, and
optionally the slice-context stage (`ichedge.context`) fitted on out-of-fold scores of the
training patients (4 inner patient folds). Prints test AUC (mean ± sd over folds), the mean
validation AUC (what a choice between rows may look at), and sensitivity / specificity at the
threshold chosen on validation for sensitivity >= 0.95. The last rows are the taps of ichedge's
multilevel head (`--head multilevel`), at three regularisation strengths, and with the head's own
fit (`ichedge.training.fit_logistic`, which floors each channel's scale at its tap's int8 step).

    python bench/ablation_context.py [../shared/data/ct-ich/labels.csv]
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import keras

from ichedge.context import SliceContext
from ichedge.data import kfold_splits, read_manifest
from ichedge.evaluation import binary_metrics, threshold_for_sensitivity
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import Preprocessing, load_inputs, slice_order
from ichedge.training import Taps, fit_logistic, remap_split

DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/ct-ich/labels.csv"


class Head:
    """A standardised, balanced logistic regression; with ``map_range`` (each image's block_16 map
    minimum and maximum), ichedge's int8-safe fit of the multilevel taps, with their int8 steps
    taken over all training images (ichedge samples 200 of them: :func:`ichedge.model.tap_int8_steps`)."""

    def __init__(self, c: float = 0.01, map_range: np.ndarray | None = None) -> None:
        self.c, self.map_range = c, map_range

    def scores(self, f: np.ndarray, y: np.ndarray, train: np.ndarray, rest: np.ndarray) -> np.ndarray:
        out = np.zeros(len(y))
        if self.map_range is not None:
            widths = [f.shape[1] - 2 * B16, B16, B16]
            avg13, avg16 = f[train][:, :widths[0]], f[train][:, widths[0]:widths[0] + B16]
            span = self.map_range[train]
            steps = [float(np.ptp(avg13)) / 255, float(np.ptp(avg16)) / 255,
                     float(span[:, 1].max() - span[:, 0].min()) / 255]  # a max keeps its map's scale
            w, b = fit_logistic(f[train], y[train], Taps(widths, steps), c=self.c)
            out[rest] = 1 / (1 + np.exp(-(f[rest] @ w + b)))
        else:
            lr = LogisticRegression(C=self.c, max_iter=3000, class_weight="balanced")
            out[rest] = make_pipeline(StandardScaler(), lr).fit(f[train], y[train]).predict_proba(f[rest])[:, 1]
        return out


def inner_folds(idx: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0):
    """Patient-grouped inner folds of ``idx``, as index arrays into the whole data."""
    for a, b in StratifiedGroupKFold(4, shuffle=True, random_state=seed).split(idx, y[idx], groups[idx]):
        yield idx[a], idx[b]


def scores(f, y, groups, order, head: Head, fit: np.ndarray, parts: list[np.ndarray], context: bool) -> np.ndarray:
    """Scores of each part (whole patients) from a head fitted on ``fit``; with context, the
    context model sees only out-of-fold scores of ``fit``."""
    p = head.scores(f, y, fit, np.concatenate(parts))
    if not context:
        return p
    oof = np.zeros(len(y))
    for inner, held in inner_folds(fit, y, groups):
        oof[held] = head.scores(f, y, inner, held)[held]
    ctx = SliceContext.fit(oof[fit], y[fit], groups[fit], order[fit])
    out = np.zeros(len(y))
    for part in parts:
        out[part] = ctx.apply(p[part], groups[part], order[part])
    return out


TARGET = 0.95  # the sensitivity the validation threshold aims at, as ichedge's sweep


def at_threshold(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float, float]:
    """AUC, and sensitivity and specificity at threshold ``t`` (ichedge's own metrics)."""
    m = binary_metrics(y, p, t)
    return m["auc"], m["sensitivity"], m["specificity"]


def seeds_meeting_target(per_seed: np.ndarray) -> int:
    """How many rows (AUC, sensitivity, specificity) meet issue 2's target."""
    return int(np.sum((per_seed[:, 0] >= 0.90) & (per_seed[:, 1] >= 0.90) & (per_seed[:, 2] >= 0.70)))


def report(name: str, f, y, splits, groups, order, context: bool, head: Head | None = None) -> None:
    head = head or Head()
    aucs, vals, sens, spec = [], [], [], []
    for s in splits:
        p = scores(f, y, groups, order, head, s.train, [s.val, s.test], context)
        t = threshold_for_sensitivity(y[s.val], p[s.val], TARGET)
        for out, value in zip((aucs, sens, spec), at_threshold(y[s.test], p[s.test], t)):
            out.append(value)
        vals.append(roc_auc_score(y[s.val], p[s.val]))
    print(f"{name:<76} {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}   val {np.mean(vals):.3f}   "
          f"sens {np.mean(sens):.3f}  spec {np.mean(spec):.3f}", flush=True)


B16 = 112  # block_16_project channels at alpha 0.35


def features(x: np.ndarray, size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features by variant (the multilevel taps at 224x224 only), and each image's block_16
    map minimum and maximum."""
    backbone = build_model(0.35, size, resolve_weights(0.35, size)).get_layer("backbone")
    names = ("block_13_expand_relu", "block_16_project_BN", "out_relu")
    sub = keras.Model(backbone.input, [backbone.get_layer(n).output for n in names])
    b13, b16, out = sub.predict(x.astype("float32") / 127.5 - 1, batch_size=32, verbose=0)
    span = np.c_[b16.min((1, 2, 3)), b16.max((1, 2, 3))]
    b16 = np.c_[b16.mean((1, 2)), b16.max((1, 2))]
    variants = {"GAP(out_relu)": out.mean((1, 2)), "GAP+GMP(block_16_project)": b16}
    if size == 224:
        variants["multilevel (GAP block_13_expand, GAP+GMP block_16)"] = np.c_[b13.mean((1, 2)), b16]
    return variants, span


def main() -> None:
    ds = read_manifest(DATA)
    print(ds.summary())
    print(f"{'variant (frozen, alpha 0.35, head crop)':<76} test AUC (5 folds)  val AUC   hs sens / spec")
    for size in (160, 224, 288):
        loaded = load_inputs(ds, Preprocessing(size, "gray", True))
        y, groups, order = loaded.y, ds.groups[loaded.indices], slice_order(ds, loaded)
        splits = [remap_split(s, loaded.indices) for s in kfold_splits(ds, 5, seed=0)]
        variants, span = features(loaded.x, size)
        for layer, f in variants.items():
            report(f"{size}px {layer}", f, y, splits, groups, order, False)
            if size == 224:
                report(f"{size}px {layer} + slice context", f, y, splits, groups, order, True)
            if "block_13" in layer:
                for c in (0.003, 0.03):
                    report(f"  same, C = {c}", f, y, splits, groups, order, True, Head(c))
                report("  same, ichedge's int8-safe fit (fit_logistic)", f, y, splits, groups, order, True,
                       Head(map_range=span))


if __name__ == "__main__":
    main()
