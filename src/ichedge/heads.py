"""Heads: what turns the MobileNetV2 backbone's feature maps into a probability of hemorrhage.

A head declares the backbone layers it reads, attaches its pooling and layers to them, fits
itself on the frozen backbone's cached features, refits on any subset of them (the slice-context
stage's out-of-fold scores), describes itself for the model card and gives Grad-CAM its map and
logit. Heads register in :data:`HEADS`:

- ``paper``: global average pooling of the last feature map, then Dense(N, ReLU) -> Dropout ->
  Dense(1, sigmoid), trained for a few epochs as Edge Impulse does;
- ``multilevel``: average pooling of ``block_13_expand_relu`` and average and max pooling of
  ``block_16_project_BN`` (:data:`MULTILEVEL_TAPS`), each tap weighted by its own Dense(1), the
  sum through a sigmoid: a logistic regression over mid- and high-level features, fitted by
  scikit-learn in one go (:func:`fit_logistic`). The backbone ends before the last 1x1
  convolution.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from tqdm.keras import TqdmCallback

from ichedge.registry import Registry


@dataclass(frozen=True)
class FitSettings:
    """What a head's fit may use of a training config."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    balanced: bool  # class weights n / (2 n_c)
    progress: bool = False


@dataclass
class FrozenFit:
    """A head fitted on cached features: its history, and ``refit(train, score, k)`` giving the
    scores of rows ``score`` from the same head fitted afresh on rows ``train`` only."""

    history: dict[str, list]
    refit: Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class CamParts:
    """What Grad-CAM needs of a head: each pooling layer with the index of the backbone output it
    pools, the index of the map to explain, and pooled features -> logit."""

    pools: list[tuple[keras.layers.Layer, int]]
    cam_map: int
    logit: Callable


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Balanced weights (n / (2 n_c)) so the 1:7 minority counts as much as the majority."""
    counts = np.bincount(y.astype(int), minlength=2)
    return {c: float(len(y) / (2 * counts[c])) if counts[c] else 1.0 for c in (0, 1)}


def compile_classifier(model: keras.Model, lr: float | keras.optimizers.schedules.LearningRateSchedule) -> None:
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])


def epoch_progress(enabled: bool) -> list[keras.callbacks.Callback]:
    """One bar over the epochs, with the metrics (none when ``enabled`` is False)."""
    return [TqdmCallback(verbose=0, leave=False)] if enabled else []


class Head(ABC):
    """The interface every registered head implements."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line for the command line's --head
    fits_trimmed: ClassVar[bool] = True  # works on a backbone without its last 1x1 convolution

    def check(self, trim: bool) -> None:
        if trim and not self.fits_trimmed:
            raise ValueError(f"trim applies to heads that read the backbone's last map (paper), not {self.name!r}")

    @abstractmethod
    def backbone_layers(self) -> tuple[str, ...]:
        """Backbone layers the head reads, in order; () for the backbone's last map."""

    @abstractmethod
    def attach(self, maps: list, neurons: int, dropout: float) -> keras.KerasTensor:
        """Pool ``maps`` (the backbone's outputs) and add the head; returns the probability."""

    @abstractmethod
    def pooled(self, model: keras.Model) -> keras.KerasTensor:
        """The pooled features of a built model: what the frozen phase caches."""

    @abstractmethod
    def matches(self, model: keras.Model) -> bool:
        """Whether ``model`` carries this head (read from its layer names)."""

    @abstractmethod
    def fit(self, model: keras.Model, features: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray,
            x: np.ndarray, settings: FitSettings) -> FrozenFit:
        """Fit the head of ``model`` on cached ``features`` of rows ``tr`` (``x``: the images)."""

    @abstractmethod
    def describe(self, neurons: int, dropout: float, trim: bool) -> str:
        """The head in words, for the model card."""

    @abstractmethod
    def frozen_training(self, epochs: int) -> str:
        """How its frozen phase trains, in a few words, for the sweep table."""

    @abstractmethod
    def cam_parts(self, model: keras.Model) -> CamParts: ...


HEADS: Registry[Head] = Registry("head", instances=True)


def head_of(model: keras.Model) -> Head:
    """The registered head ``model`` carries (ValueError if none)."""
    for head in HEADS:
        if head.matches(model):
            return head
    raise ValueError(f"{model.name}: carries none of this version's heads ({', '.join(HEADS.names())})")


# --- the paper's head ---------------------------------------------------------------------------


def build_head(features: int, neurons: int = 8, dropout: float = 0.1) -> keras.Model:
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(neurons, activation="relu", name="dense")(inputs)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="hemorrhage")(x)
    return keras.Model(inputs, outputs, name="head")


def fit_dense_head(head: keras.Model, features: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray | None,
                   settings: FitSettings) -> dict[str, list]:
    """Train a dense head on cached features (the frozen phase); returns its history."""
    compile_classifier(head, settings.learning_rate)
    h = head.fit(
        features[tr], y[tr], validation_data=None if va is None else (features[va], y[va]),
        epochs=settings.epochs, batch_size=settings.batch_size,
        class_weight=class_weights(y[tr]) if settings.balanced else None, verbose=0,
        callbacks=epoch_progress(settings.progress), shuffle=True,
    )
    return h.history


@HEADS.register("paper")
class PaperHead(Head):
    name = "paper"
    help = "pooled last map -> Dense(neurons) -> dropout -> output"

    def backbone_layers(self) -> tuple[str, ...]:
        return ()

    def attach(self, maps: list, neurons: int, dropout: float) -> keras.KerasTensor:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(maps[0])
        return build_head(int(x.shape[-1]), neurons, dropout)(x)

    def pooled(self, model: keras.Model) -> keras.KerasTensor:
        return model.get_layer("pool").output

    def matches(self, model: keras.Model) -> bool:
        return any(layer.name == "pool" for layer in model.layers)

    def fit(self, model: keras.Model, features: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray,
            x: np.ndarray, settings: FitSettings) -> FrozenFit:
        head = model.get_layer("head")
        history = fit_dense_head(head, features, y, tr, va, settings)

        def refit(train: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
            keras.utils.set_random_seed(settings.seed + 1 + k)
            fresh = build_head(features.shape[1], head.get_layer("dense").units, head.get_layer("dropout").rate)
            fit_dense_head(fresh, features, y, train, None, replace(settings, progress=False))
            return fresh.predict(features[score], batch_size=256, verbose=0).reshape(-1)

        return FrozenFit(history, refit)

    def describe(self, neurons: int, dropout: float, trim: bool) -> str:
        return f"{'trimmed backbone, ' if trim else ''}head Dense({neurons}, ReLU) -> Dropout({dropout}) -> sigmoid"

    def frozen_training(self, epochs: int) -> str:
        return f"frozen {epochs} ep"

    def cam_parts(self, model: keras.Model) -> CamParts:
        head = model.get_layer("head")
        dense, out = head.get_layer("dense"), head.get_layer("hemorrhage")
        return CamParts([(model.get_layer("pool"), 0)], 0,
                        lambda pooled: tf.matmul(dense(pooled[0]), out.kernel) + out.bias)


# --- the multilevel logistic head ---------------------------------------------------------------

# Backbone layer and pooling of each multilevel tap, chosen on validation AUC among frozen-feature
# variants in issue 2 (bench/ablation_context.py measures them beside single-layer features).
# Likely why they help: block_13 sees 14x14 cells at 224x224, fine enough for small bleeds, and
# max pooling keeps a small bright focus that averaging dilutes.
MULTILEVEL_TAPS = (("block_13_expand_relu", "avg"), ("block_16_project_BN", "avg"), ("block_16_project_BN", "max"))
# Grad-CAM's map for the multilevel head: post-ReLU (as Grad-CAM assumes), 14x14 at 224x224, and
# upstream of block_16, so the gradient carries the evidence of every tap.
MULTILEVEL_CAM_LAYER = "block_13_expand_relu"
# L2 strength of the multilevel head's logistic regression on standardised features, as in the
# frozen-feature ablations; bench/ablation_context.py measures 0.003 (lower validation AUC) and
# 0.03 (tied) beside it.
LOGISTIC_C = 0.01
# Training images that set the multilevel taps' int8 steps: as many as `ichedge export` calibrates on.
INT8_STEP_IMAGES = 200


def pool_name(layer: str, how: str) -> str:
    """Name of the pooling layer of one multilevel tap."""
    return f"pool_{how}_{layer}"


def multilevel_layers() -> tuple[str, ...]:
    """The backbone layers the multilevel taps read, in the order the backbone returns them."""
    return tuple(dict.fromkeys(layer for layer, _ in MULTILEVEL_TAPS))


def build_multilevel_head(taps: list[int]) -> keras.Model:
    """One Dense(1) per pooled tap, summed to the logit: a linear model that int8 quantises well,
    because each tap keeps its own quantisation scale instead of sharing one in a concatenation.
    The bias sits on the first tap's Dense (``tap0_weights``)."""
    inputs = [keras.Input((n,), name=f"tap{i}") for i, n in enumerate(taps)]
    terms = [keras.layers.Dense(1, use_bias=i == 0, name=f"tap{i}_weights")(t) for i, t in enumerate(inputs)]
    logit = keras.layers.Add(name="logit")(terms)
    outputs = keras.layers.Activation("sigmoid", name="hemorrhage")(logit)
    return keras.Model(inputs, outputs, name="head")


def tap_int8_steps(model: keras.Model, x: np.ndarray) -> list[float]:
    """Each multilevel tap's int8 resolution, its tensor's range / 255 over images ``x``.

    Full-integer conversion gives every tensor one scale from its calibration range. A mean gets
    its own, but a max keeps its input's (TFLite's REDUCE_MAX does not rescale), so a max tap is
    resolved in steps of its whole feature map's range.
    """
    tensors = [model.get_layer(pool_name(layer, how)).input if how == "max" else
               model.get_layer(pool_name(layer, how)).output for layer, how in MULTILEVEL_TAPS]
    values = keras.Model(model.input, tensors).predict(x.astype("float32"), batch_size=32, verbose=0)
    return [float(v.max() - v.min()) / 255 for v in values]


@dataclass(frozen=True)
class Taps:
    """The multilevel head's pooled taps: each one's width in the cached features, and its int8 step
    (:func:`tap_int8_steps`)."""

    widths: list[int]
    steps: list[float]


def fit_logistic(features: np.ndarray, y: np.ndarray, taps: Taps, balanced: bool = True,
                 c: float = LOGISTIC_C) -> tuple[np.ndarray, float]:
    """A standardised L2 logistic regression, returned as weights and bias on the raw features.

    Standardising weighs every channel alike, but int8 resolves a tap only in steps of its
    tensor's range / 255: a channel that varies less than that would get a weight int8 cannot
    honour (one fold at 224x224: int8 AUC 0.83 against 0.88 in float; 0.87 in both with the
    floor). So no channel is scaled by less than its tap's step.
    """
    if sum(taps.widths) != features.shape[1] or len(taps.widths) != len(taps.steps):
        raise ValueError(f"taps of widths {taps.widths} and {len(taps.steps)} steps do not fit "
                         f"{features.shape[1]} features")
    mean = features.mean(0)
    floor = np.repeat(np.maximum(taps.steps, 1e-6), taps.widths)
    scale = np.maximum(features.std(0), floor)
    lr = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None)
    lr.fit((features - mean) / scale, y)
    w = lr.coef_[0] / scale
    return w, float(lr.intercept_[0] - w @ mean)


def logistic_scores(w: np.ndarray, b: float, features: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-(features @ w + b)))


@HEADS.register("multilevel")
class MultilevelHead(Head):
    name = "multilevel"
    help = ("logistic regression on pooled block_13 and block_16 features (frozen backbone: fitted, so "
            "--neurons, --dropout, --epochs and --learning-rate do not apply)")
    fits_trimmed = False  # it stops before that convolution anyway

    def backbone_layers(self) -> tuple[str, ...]:
        return multilevel_layers()

    def attach(self, maps: list, neurons: int, dropout: float) -> keras.KerasTensor:
        by_layer = dict(zip(self.backbone_layers(), maps))
        pools = [(keras.layers.GlobalAveragePooling2D if how == "avg" else keras.layers.GlobalMaxPooling2D)(
            name=pool_name(layer, how))(by_layer[layer]) for layer, how in MULTILEVEL_TAPS]
        return build_multilevel_head([int(p.shape[-1]) for p in pools])(pools)

    def pooled(self, model: keras.Model) -> keras.KerasTensor:
        pools = [model.get_layer(pool_name(layer, how)).output for layer, how in MULTILEVEL_TAPS]
        return keras.layers.Concatenate(name="taps")(pools)

    def matches(self, model: keras.Model) -> bool:
        names = {layer.name for layer in model.layers}
        return all(pool_name(layer, how) in names for layer, how in MULTILEVEL_TAPS)

    def fit(self, model: keras.Model, features: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray,
            x: np.ndarray, settings: FitSettings) -> FrozenFit:
        """Fit the logistic regression and write it into the head's Dense layers; its one-step
        history, with losses weighted as Keras weighs them (class weights on training only)."""
        head = model.get_layer("head")
        sample = np.random.default_rng(settings.seed).permutation(tr)[:INT8_STEP_IMAGES]
        taps = Taps([int(t.shape[-1]) for t in head.inputs], tap_int8_steps(model, x[np.sort(sample)]))
        w, b = fit_logistic(features[tr], y[tr], taps, settings.balanced)
        for i, part in enumerate(np.split(w, np.cumsum(taps.widths)[:-1])):
            bias = [np.array([b], "float32")] if i == 0 else []  # build_multilevel_head: the bias is tap0's
            head.get_layer(f"tap{i}_weights").set_weights([part[:, None].astype("float32")] + bias)
        cw = class_weights(y[tr]) if settings.balanced else None
        history: dict[str, list] = {}
        for prefix, idx, weights in (("", tr, cw), ("val_", va, None)):
            p = logistic_scores(w, b, features[idx])
            sample_weight = None if weights is None else np.array([weights[int(c)] for c in y[idx]])
            history[f"{prefix}loss"] = [log_loss(y[idx], p, sample_weight=sample_weight, labels=[0, 1])]
            history[f"{prefix}auc"] = [roc_auc_score(y[idx], p)]

        def refit(train: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
            return logistic_scores(*fit_logistic(features[train], y[train], taps, settings.balanced), features[score])

        return FrozenFit(history, refit)

    def describe(self, neurons: int, dropout: float, trim: bool) -> str:
        taps = ", ".join(f"{'GAP' if how == 'avg' else 'GMP'}({layer})" for layer, how in MULTILEVEL_TAPS)
        return f"multilevel logistic head: {taps}, one Dense(1) each, summed -> sigmoid"

    def frozen_training(self, epochs: int) -> str:
        return "frozen, logistic multilevel head"

    def cam_parts(self, model: keras.Model) -> CamParts:
        layers = multilevel_layers()
        head = model.get_layer("head")
        return CamParts([(model.get_layer(pool_name(layer, how)), layers.index(layer)) for layer, how in MULTILEVEL_TAPS],
                        layers.index(MULTILEVEL_CAM_LAYER), keras.Model(head.inputs, head.get_layer("logit").output))
