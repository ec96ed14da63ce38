"""MobileNetV2(rho, alpha) with a registered head (:mod:`ichedge.heads`), and where its starting
weights come from.

The model takes uint8-range pixels (0..255, shape rho x rho x 3) and rescales them itself, then
runs the MobileNetV2 backbone and the head, which outputs the probability of hemorrhage.

Weights are resolved offline first: a file the user gives, the ImageNet files bundled in the
package (alpha 0.35), Keras's own download when online, and random weights only when asked or
when none exist for that width; then the run says so loudly and records it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import keras

from ichedge.heads import HEADS, head_of

log = logging.getLogger(__name__)

# Widths for which Keras publishes ImageNet weights, and the resolutions they were trained at.
KERAS_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
KERAS_ROWS = (96, 128, 160, 192, 224)
KERAS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"


def weights_filename(alpha: float, rows: int) -> str:
    """Keras's own name for the file (alpha written as a float: ``1.0``, ``0.35``)."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


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

    ``trim`` drops the backbone's last 1x1 convolution (see :data:`TRIM_AT`); ``head`` names a
    registered head (``neurons`` and ``dropout`` shape the paper's).
    """
    chosen = HEADS.get(head)
    chosen.check(trim)
    keras.utils.set_random_seed(seed)
    layers = chosen.backbone_layers()
    backbone = build_backbone(alpha, size, weights, trim, layers)
    inputs = keras.Input((size, size, 3), name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(inputs)
    # A pretrained backbone keeps its batch-norm statistics (inference mode) even when its
    # layers are unfrozen: re-estimating them on a few hundred CT slices destroys the features.
    x = backbone(x, training=False) if weights.pretrained else backbone(x)
    outputs = chosen.attach(list(x) if layers else [x], neurons, dropout)
    return keras.Model(inputs, outputs, name=f"mobilenetv2_{size}_{alpha:g}")


def feature_extractor(model: keras.Model) -> keras.Model:
    """The model up to its head's pooled features: what the frozen phase computes once and caches."""
    return keras.Model(model.input, head_of(model).pooled(model), name="features")
