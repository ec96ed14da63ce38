"""MobileNetV2(rho, alpha) with the paper's head or a multi-level linear head, and where its
starting weights come from.

The model takes uint8-range pixels (0..255, shape rho x rho x 3) and rescales them itself, then
runs the MobileNetV2 backbone and one of two heads (:data:`HEADS`):

- ``paper``: global average pooling of the last feature map, then Dense(N, ReLU) -> Dropout ->
  Dense(1, sigmoid), the probability of hemorrhage;
- ``multilevel``: average pooling of ``block_13_expand_relu`` and average and max pooling of
  ``block_16_project_BN`` (:data:`MULTILEVEL_TAPS`), each tap weighted by its own Dense(1), the
  sum through a sigmoid: a logistic regression over mid- and high-level features, fitted by
  :func:`ichedge.training.fit_logistic`. The backbone ends before the last 1x1 convolution.

Weights are resolved offline first: a file the user gives, the ImageNet files bundled in the
package (alpha 0.35), Keras's own download when online, and random weights only when asked or
when none exist for that width; then the run says so loudly and records it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

# Widths for which Keras publishes ImageNet weights, and the resolutions they were trained at.
KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
KERAS_ROWS = (96, 128, 160, 192, 224)
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


def weights_filename(alpha: float, rows: int) -> str:
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha:g}_{rows}_no_top.h5"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Weights:
    """Where a backbone's starting weights came from; stored in every run's config."""

    source: str  # "file", "bundled", "keras-download" or "random"
    path: str | None = None
    sha256: str | None = None
    note: str = ""

    @property
    def pretrained(self) -> bool:
        return self.source != "random"

    def to_json(self) -> dict:
        return asdict(self)


def _bundled(alpha: float, size: int) -> Path | None:
    folder = Path(str(resources.files("ichedge") / "weights"))
    found = sorted(
        (abs(rows - size), path)
        for rows in KERAS_ROWS
        if (path := folder / weights_filename(alpha, rows)).is_file()
    )
    return found[0][1] if found else None


def resolve_weights(
    alpha: float, size: int, weights: str | Path = "imagenet", cache_dir: str | Path | None = None
) -> Weights:
    """Decide the starting weights for MobileNetV2(alpha) at input size ``size``.

    ``weights`` is ``"imagenet"`` (bundled file, else Keras download), ``"random"``, or the path
    of a Keras no-top weights file. ``cache_dir`` is where Keras keeps downloads.
    """
    if str(weights) == "random":
        return Weights("random", note="random weights, as asked")
    if str(weights) != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found")
        return Weights("file", str(path), sha256(path))
    if (bundled := _bundled(alpha, size)) is not None:
        return Weights("bundled", str(bundled), sha256(bundled), "ImageNet, bundled with ichedge")
    if alpha not in KERAS_ALPHAS:
        note = f"no ImageNet weights exist for alpha {alpha:g}: training from random weights"
        log.warning("RANDOM WEIGHTS: %s", note)
        return Weights("random", note=note)
    rows = min(KERAS_ROWS, key=lambda r: abs(r - size))
    name = weights_filename(alpha, rows)
    try:
        path = keras.utils.get_file(name, KERAS_URL + name, cache_subdir="models", cache_dir=cache_dir)
    except Exception as exc:  # any network or file error means: not available here
        note = f"ImageNet weights for alpha {alpha:g} could not be downloaded ({type(exc).__name__}): training from random weights"
        log.warning("RANDOM WEIGHTS: %s", note)
        return Weights("random", note=note)
    return Weights("keras-download", str(path), sha256(Path(path)), "ImageNet, Keras download")


# The last 1x1 convolution widens 320*alpha channels to 1280 whatever alpha is: at alpha 0.35
# it holds about a third of the weights. Trimming it pools the last block's 112 channels instead.
TRIM_AT = "block_16_project_BN"


HEADS = ("paper", "multilevel")
# Backbone layer and pooling of each multilevel tap, chosen on validation AUC among frozen-feature
# variants in issue 2 (bench/ablation_context.py measures them beside single-layer features).
# Likely why they help: block_13 sees 14x14 cells at 224x224, fine enough for small bleeds, and
# max pooling keeps a small bright focus that averaging dilutes.
MULTILEVEL_TAPS = (("block_13_expand_relu", "avg"), ("block_16_project_BN", "avg"), ("block_16_project_BN", "max"))
# Grad-CAM's map for the multilevel head: post-ReLU (as Grad-CAM assumes), 14x14 at 224x224, and
# upstream of block_16, so the gradient carries the evidence of every tap.
MULTILEVEL_CAM_LAYER = "block_13_expand_relu"


def build_backbone(alpha: float, size: int, weights: Weights, trim: bool = False,
                   outputs: tuple[str, ...] = ()) -> keras.Model:
    """MobileNetV2 without top; ``outputs`` names the layers it returns (default: its last)."""
    full = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None
    )
    if weights.pretrained:
        full.load_weights(weights.path)
    if outputs:
        backbone = keras.Model(full.input, [full.get_layer(n).output for n in outputs])
    else:
        backbone = keras.Model(full.input, full.get_layer(TRIM_AT).output) if trim else full
    backbone.name = "backbone"
    if not weights.pretrained:
        # Keras's MobileNetV2 uses batch-norm momentum 0.999, tuned for ImageNet's long runs: in
        # a few hundred from-scratch steps the moving statistics would barely leave their initial
        # values and inference outputs would be constant.
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    return backbone


def build_model(
    alpha: float,
    size: int,
    weights: Weights,
    neurons: int = 8,
    dropout: float = 0.1,
    seed: int = 0,
    trim: bool = False,
    head: str = "paper",
) -> keras.Model:
    """The full classifier: pixels -> rescale -> backbone -> pooling -> head -> probability.

    ``trim`` drops the backbone's last 1x1 convolution (see :data:`TRIM_AT`); ``head`` is one
    of :data:`HEADS` (``neurons`` and ``dropout`` shape the paper's).
    """
    check_head(head, trim)
    keras.utils.set_random_seed(seed)
    layers = multilevel_layers() if head == "multilevel" else ()
    backbone = build_backbone(alpha, size, weights, trim, layers)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    # A pretrained backbone keeps its batch-norm statistics (inference mode) even when its
    # layers are unfrozen: re-estimating them on a few hundred CT slices destroys the features.
    x = backbone(x, training=False) if weights.pretrained else backbone(x)
    if head == "multilevel":
        maps = dict(zip(layers, x))
        pools = [(keras.layers.GlobalAveragePooling2D if how == "avg" else keras.layers.GlobalMaxPooling2D)(
            name=pool_name(layer, how))(maps[layer]) for layer, how in MULTILEVEL_TAPS]
        outputs = build_multilevel_head([int(p.shape[-1]) for p in pools])(pools)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        outputs = build_head(int(x.shape[-1]), neurons, dropout)(x)
    return keras.Model(inputs, outputs, name=f"mobilenetv2_{size}_{alpha:g}")


def check_head(head: str, trim: bool = False) -> None:
    """ValueError unless ``head`` is one of :data:`HEADS` and goes with ``trim``."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if trim and head == "multilevel":
        raise ValueError("trim applies to the paper head only (the multilevel head stops before that convolution anyway)")


def pool_name(layer: str, how: str) -> str:
    """Name of the pooling layer of one multilevel tap."""
    return f"pool_{how}_{layer}"


def multilevel_layers() -> tuple[str, ...]:
    """The backbone layers the multilevel taps read, in the order the backbone returns them."""
    return tuple(dict.fromkeys(layer for layer, _ in MULTILEVEL_TAPS))


def describe_head(head: str, neurons: int, dropout: float, trim: bool = False) -> str:
    """The head in words, for the model card; the multilevel taps are read from :data:`MULTILEVEL_TAPS`."""
    if head == "multilevel":
        taps = ", ".join(f"{'GAP' if how == 'avg' else 'GMP'}({layer})" for layer, how in MULTILEVEL_TAPS)
        return f"multilevel logistic head: {taps}, one Dense(1) each, summed -> sigmoid"
    return f"{'trimmed backbone, ' if trim else ''}head Dense({neurons}, ReLU) -> Dropout({dropout}) -> sigmoid"


def build_head(features: int, neurons: int = 8, dropout: float = 0.1) -> keras.Model:
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(neurons, activation="relu", name="dense")(inputs)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="hemorrhage")(x)
    return keras.Model(inputs, outputs, name="head")


def build_multilevel_head(taps: list[int]) -> keras.Model:
    """One Dense(1) per pooled tap, summed to the logit: a linear model that int8 quantises well,
    because each tap keeps its own quantisation scale instead of sharing one in a concatenation.
    The bias sits on the first tap's Dense (``tap0_weights``)."""
    inputs = [keras.Input((n,), name=f"tap{i}") for i, n in enumerate(taps)]
    terms = [keras.layers.Dense(1, use_bias=i == 0, name=f"tap{i}_weights")(t) for i, t in enumerate(inputs)]
    logit = keras.layers.Add(name="logit")(terms)
    outputs = keras.layers.Activation("sigmoid", name="hemorrhage")(logit)
    return keras.Model(inputs, outputs, name="head")


def head_kind(model: keras.Model) -> str:
    """Which of :data:`HEADS` an ichedge model carries (ValueError if neither)."""
    names = {layer.name for layer in model.layers}
    if "pool" in names:
        return "paper"
    if all(pool_name(layer, how) in names for layer, how in MULTILEVEL_TAPS):
        return "multilevel"
    raise ValueError(f"{model.name}: neither the paper head nor this version's multilevel taps")


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


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to the pooled features (the multilevel taps side by side): what the frozen
    phase computes once and caches."""
    if head_kind(model) == "paper":
        return keras.Model(model.input, model.get_layer("pool").output, name="features")
    pools = [model.get_layer(pool_name(layer, how)).output for layer, how in MULTILEVEL_TAPS]
    return keras.Model(model.input, keras.layers.Concatenate(name="taps")(pools), name="features")
