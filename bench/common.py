"""What the bench scripts share: command lines, data loading, frozen MobileNetV2 features, the
logistic head and slice context, patient folds, scoring with ichedge's metrics, and table cells.

Importing this module defines functions and constants only (ichedge's own imports aside: the
package's training and model modules import TensorFlow). Scripts are run as
``python bench/<name>.py``, which puts ``bench/`` on ``sys.path``, so they ``import common``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ichedge.context import SliceContext
from ichedge.data import kfold_splits, read_manifest
from ichedge.evaluation import binary_metrics, threshold_for_sensitivity
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import Preprocessing, load_inputs, slice_order
from ichedge.heads import Taps, fit_logistic
from ichedge.training import remap_split

# The full-resolution CT-ICH (650x650 JPEGs), as the Makefile's CT_ICH.
DEFAULT_DATA = "../shared/data/ct-ich/labels.csv"
TARGET = 0.95  # the sensitivity the validation threshold aims at, as ichedge's sweep
ALPHA = 0.35  # the backbone width every frozen-feature experiment uses
B16 = 112  # block_16_project channels at alpha 0.35
MULTILEVEL = "multilevel (GAP block_13_expand, GAP+GMP block_16)"  # ichedge's --head multilevel taps


# Command lines


def parser(doc: str | None, data: bool = False) -> argparse.ArgumentParser:
    """An argument parser whose description is the script's docstring, line breaks kept; with
    ``data``, the optional positional manifest of the full-resolution images."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if data:
        ap.add_argument("data", nargs="?", default=DEFAULT_DATA,
                        help=f"a CT-ICH style labels.csv (default: {DEFAULT_DATA})")
    return ap


# Data


def read_data(path: str):
    """Read a manifest and print its summary."""
    ds = read_manifest(path)
    print(ds.summary())
    return ds


def head_crop_inputs(ds, size: int) -> tuple:
    """Gray images cropped to the head at ``size``; their labels, patients and slice order."""
    loaded = load_inputs(ds, Preprocessing(size, "gray", True))
    return loaded, loaded.y, ds.groups[loaded.indices], slice_order(ds, loaded)


def patient_folds(ds, indices: np.ndarray | None = None, seed: int = 0) -> list:
    """The 5 patient folds of ``ichedge sweep --cv --seed S``, as positions among the loaded
    images (``indices``; None when every image loaded)."""
    splits = kfold_splits(ds, 5, seed=seed)
    return splits if indices is None else [remap_split(s, indices) for s in splits]


# Frozen features


def backbone_maps(x: np.ndarray, size: int, layers: Sequence[str], batch_size: int = 32) -> list[np.ndarray]:
    """Feature maps of the frozen ImageNet MobileNetV2 (alpha 0.35) at the named layers, one
    array per layer (a fresh model each call)."""
    backbone = build_model(ALPHA, size, resolve_weights(ALPHA, size)).get_layer("backbone")
    sub = keras.Model(backbone.input, [backbone.get_layer(n).output for n in layers])
    outs = sub.predict(x.astype("float32") / 127.5 - 1, batch_size=batch_size, verbose=0)
    return outs if isinstance(outs, list) else [outs]


def gap(m: np.ndarray) -> np.ndarray:
    """Global average pooling of (n, h, w, c) maps."""
    return m.mean((1, 2))


def gap_gmp(m: np.ndarray) -> np.ndarray:
    """Global average and global max pooling side by side."""
    return np.c_[m.mean((1, 2)), m.max((1, 2))]


def frozen_variants(x: np.ndarray, size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pooled features by variant (the multilevel taps at 224x224 only), and each image's block_16
    map minimum and maximum."""
    b13, b16, out = backbone_maps(x, size, ("block_13_expand_relu", "block_16_project_BN", "out_relu"))
    span = np.c_[b16.min((1, 2, 3)), b16.max((1, 2, 3))]
    b16 = gap_gmp(b16)
    variants = {"GAP(out_relu)": gap(out), "GAP+GMP(block_16_project)": b16}
    if size == 224:
        variants[MULTILEVEL] = np.c_[gap(b13), b16]
    return variants, span


# Heads, slice context and folds


class Head:
    """A standardised, balanced logistic regression; with ``map_range`` (each image's block_16 map
    minimum and maximum), ichedge's int8-safe fit of the multilevel taps, with their int8 steps
    taken over all training images (ichedge samples 200 of them: :func:`ichedge.heads.tap_int8_steps`)."""

    def __init__(self, c: float = 0.01, map_range: np.ndarray | None = None) -> None:
        self.c, self.map_range = c, map_range

    def scores(self, f: np.ndarray, y: np.ndarray, train: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """Scores of ``rest`` (zero elsewhere) from a fit on ``train``."""
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


def inner_folds(idx: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
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


# Scoring


def at_threshold(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float, float]:
    """AUC, and sensitivity and specificity at threshold ``t`` (ichedge's own metrics)."""
    m = binary_metrics(y, p, t)
    return m["auc"], m["sensitivity"], m["specificity"]


def at_validation_threshold(y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray,
                            p_test: np.ndarray) -> tuple[float, float, float]:
    """Test AUC, sensitivity and specificity at the threshold chosen on validation for
    sensitivity >= TARGET, as ichedge's sweep."""
    return at_threshold(y_test, p_test, threshold_for_sensitivity(y_val, p_val, TARGET))


def seeds_meeting_target(per_seed: np.ndarray) -> int:
    """How many rows (AUC, sensitivity, specificity) meet issue 2's target."""
    return int(np.sum((per_seed[:, 0] >= 0.90) & (per_seed[:, 1] >= 0.90) & (per_seed[:, 2] >= 0.70)))


# Table cells


def mean_sd(values) -> str:
    """Mean ± sample standard deviation, three decimals."""
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def slashed(values, sep: str = "/") -> str:
    """Values to three decimals joined by ``sep`` (AUC / sensitivity / specificity cells)."""
    return sep.join(f"{v:.3f}" for v in values)
