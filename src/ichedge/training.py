"""Transfer learning as Edge Impulse does it, and the run folder each training writes.

A pretrained backbone is first frozen: its pooled features are computed once for every image
(seconds, not minutes, on 2 cores) and the head is trained on them. Optional fine-tuning then
unfreezes the top of the backbone, keeps its batch-norm statistics fixed, and trains on
augmented images at a lower rate. A backbone without pretrained weights has nothing to freeze,
so the whole network trains from scratch on augmented images. The ``multilevel`` head is a
logistic regression: on frozen features scikit-learn fits it in one go, no epochs (see
:mod:`ichedge.heads`). With ``context``, a slice-context
model (:mod:`ichedge.context`) is fitted on out-of-fold head scores of the training patients and
evaluated beside the slice model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import StratifiedGroupKFold

from ichedge import __version__
from ichedge.context import SliceContext
from ichedge.data import DataError, Dataset, Split, check_no_patient_overlap
from ichedge.evaluation import calibration, evaluate_split, evaluate_studies, intervals, per_source
from ichedge.heads import HEADS, FitSettings, FrozenFit, class_weights, compile_classifier, epoch_progress
from ichedge.model import Weights, build_model, feature_extractor, resolve_weights
from ichedge.plots import plot_confusion, plot_history, plot_pr, plot_reliability, plot_roc
from ichedge.preprocess import Loaded, Preprocessing, load_inputs, patient_groups, slice_order
from ichedge.report import write_run_report
from ichedge.quality import InputReference
from ichedge.runs import RunWriter, new_folder
from ichedge.studies import DEFAULT_AGGREGATE, study_score

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that defines a training run; stored as config.json in the run folder."""

    size: int = 96
    alpha: float = 0.35
    channels: str = "gray"
    crop: bool = True
    neurons: int = 8
    dropout: float = 0.1
    trim: bool = False
    head: str = "paper"
    epochs: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 32
    fine_tune_epochs: int = 0
    fine_tune_lr: float = 1e-4
    fine_tune_from: str = "block_13_expand"
    augment: bool = True
    class_weight: bool = True
    weights: str = "imagenet"
    target_sensitivity: float = 0.95
    study_aggregate: str = DEFAULT_AGGREGATE
    context: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "epochs must be at least 1": self.epochs >= 1,
            "fine_tune_epochs must be 0 or more": self.fine_tune_epochs >= 0,
            "learning rates must be positive": self.learning_rate > 0 and self.fine_tune_lr > 0,
            "batch_size must be at least 1": self.batch_size >= 1,
            "neurons must be at least 1": self.neurons >= 1,
            "dropout must be in [0, 1)": 0 <= self.dropout < 1,
            "alpha must be positive": self.alpha > 0,
            "target_sensitivity must be in (0, 1]": 0 < self.target_sensitivity <= 1,
            # Out-of-fold slice scores for the context model retrain the head on cached features;
            # with fine-tuning each would be a whole training.
            "context needs the frozen-backbone training only (fine_tune_epochs 0)":
                not (self.context and self.fine_tune_epochs),
        }
        failed = [text for text, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))
        study_score([0.0], self.study_aggregate)  # ValueError unless an aggregate study_score knows (any topK)
        HEADS.get(self.head).check(self.trim)
        self.preprocessing  # validates size and channel mode

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(size=self.size, channels=self.channels, crop=self.crop)

    @property
    def name(self) -> str:
        return (f"{self.size}px-a{self.alpha:g}-{self.channels}" + ("-trim" if self.trim else "")
                + (f"-{self.head}" if self.head != "paper" else "") + ("-context" if self.context else ""))

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def fit_settings(self) -> FitSettings:
        return FitSettings(self.epochs, self.learning_rate, self.batch_size, self.seed, self.class_weight)


@dataclass
class TrainResult:
    """What a training produced: the model, its curves and its test metrics."""

    model: keras.Model
    weights: Weights
    history: dict[str, list]
    metrics: dict[str, dict[str, float]]
    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    features: np.ndarray | None = None  # the frozen backbone's, reusable by other folds
    context: SliceContext | None = None


# --- inputs ------------------------------------------------------------------------------------


def augmenter(seed: int) -> keras.Sequential:
    """Flips, small shifts and rotations, brightness and contrast: what a CT slice can vary by."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed),
            keras.layers.RandomRotation(0.04, fill_mode="constant", seed=seed),
            keras.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed),
            keras.layers.RandomContrast(0.15, value_range=(0, 255), seed=seed),
        ],
        name="augment",
    )


def _image_batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int, augment: bool) -> tf.data.Dataset:
    data = tf.data.Dataset.from_tensor_slices((x, y.astype("float32")))
    data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).batch(batch)
    data = data.map(lambda a, b: (tf.cast(a, tf.float32), b))
    if augment:
        aug = augmenter(seed)
        data = data.map(lambda a, b: (tf.clip_by_value(aug(a, training=True), 0.0, 255.0), b))
    return data.prefetch(tf.data.AUTOTUNE)


def _append(history: dict[str, list], new: dict[str, list], phase: str) -> None:
    for key, values in new.items():
        history.setdefault(key, []).extend(float(v) for v in values)
    history.setdefault("phase", []).extend([phase] * len(next(iter(new.values()))))


# --- training ---------------------------------------------------------------------------------


def compute_features(model: keras.Model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Pooled backbone features of every image: the frozen phase's cache."""
    return feature_extractor(model).predict(x.astype("float32"), batch_size=batch, verbose=0)


def fit(
    config: TrainConfig,
    inputs: Loaded,
    split: Split,
    features: np.ndarray | None = None,
    progress: bool = False,
    groups: np.ndarray | None = None,
    order: np.ndarray | None = None,
    sources: np.ndarray | None = None,
    extract: Callable[[keras.Model, np.ndarray], np.ndarray] = compute_features,
) -> TrainResult:
    """Train one model on ``split`` of already loaded inputs and evaluate it on the test part.

    ``split`` indexes ``inputs.x``. ``features``, if given, are the frozen backbone's pooled
    features of ``inputs.x`` (reused across folds of a cross-validation). ``groups``, the
    patient of each input, adds study-level (patient-level) metrics; with ``order``, each
    input's slice position, ``config.context`` fits and evaluates a slice-context model.
    ``sources``, each input's hospital or collection, adds every test figure per source.
    ``extract(model, x)`` computes the frozen features when they are not given (an engine of
    :mod:`ichedge.scale` spreads them over workers).
    """
    x, y = inputs.x, inputs.y
    check_split_usable(y, split)
    if config.context and (groups is None or order is None):
        raise DataError(CONTEXT_NEEDS)
    weights = resolve_weights(config.alpha, config.size, config.weights)
    model = build_model(config.alpha, config.size, weights, config.neurons, config.dropout, config.seed, config.trim,
                        config.head)
    tr, va, te = split.train, split.val, split.test
    cw = class_weights(y[tr]) if config.class_weight else None
    history: dict[str, list] = {}
    seconds: dict[str, float] = {}

    backbone = model.get_layer("backbone")
    frozen: FrozenFit | None = None
    if weights.pretrained and config.fine_tune_epochs:
        _first_layer(backbone, config.fine_tune_from)  # a typo fails now, not after the frozen phase
    if weights.pretrained:
        start = time.perf_counter()
        if features is None:
            features = extract(model, x)
        seconds["features"] = time.perf_counter() - start
        start = time.perf_counter()
        settings = replace(config.fit_settings, progress=progress)
        frozen = HEADS.get(config.head).fit(model, features, y, tr, va, x, settings)
        _append(history, frozen.history, "frozen")
        seconds["frozen"] = time.perf_counter() - start
        if config.fine_tune_epochs > 0:
            start = time.perf_counter()
            unfreeze_top(backbone, config.fine_tune_from)
            _fit_images(model, config, inputs, split, config.fine_tune_epochs, config.fine_tune_lr, cw, progress, history, "fine-tune")
            seconds["fine_tune"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        _fit_images(model, config, inputs, split, config.epochs, config.learning_rate, cw, progress, history, "from-scratch")
        seconds["from_scratch"] = time.perf_counter() - start

    metrics, probs, labels = held_out_metrics(config, model, inputs, split, groups)
    context = None
    if config.context:
        if frozen is not None:
            start = time.perf_counter()
            context = _fit_context(config, frozen, y, split, groups, order)
            for part, idx in (("val", va), ("test", te)):
                probs[f"{part}_context"] = context.apply(probs[part], groups[idx], order[idx])
            metrics.update(_context_metrics(config, labels, probs, groups[va], groups[te]))
            seconds["context"] = time.perf_counter() - start
        else:  # nothing cached to retrain the head on: every out-of-fold score would be a training
            metrics["context_skipped"] = {"reason": f"random weights: the whole network trains ({weights.note})"}
            log.warning("NO SLICE CONTEXT for %s: it needs a frozen pretrained backbone", config.name)
    if sources is not None:
        metrics.update(_source_metrics(config, metrics, labels, probs, sources[te], None if groups is None else groups[te]))
    return TrainResult(model, weights, history, metrics, probs, labels, seconds, features, context)


def held_out_metrics(config: TrainConfig, model: keras.Model, inputs: Loaded, split: Split,
                     groups: np.ndarray | None) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A trained model's figures: thresholds chosen on the validation rows, metrics with intervals
    and calibration on the test rows, study-level ones where ``groups`` gives patients."""
    x, y, va, te = inputs.x, inputs.y, split.val, split.test
    probs = {part: predict_probabilities(model, x[idx]) for part, idx in (("val", va), ("test", te))}
    labels = {"val": y[va], "test": y[te]}
    metrics = evaluate_split(labels["val"], probs["val"], labels["test"], probs["test"], config.target_sensitivity)
    metrics["intervals"] = intervals(
        labels["test"], probs["test"], None if groups is None else groups[te],
        {"default": 0.5, "high_sensitivity": metrics["high_sensitivity"]["threshold"]})
    metrics["calibration"] = calibration(labels["val"], probs["val"], labels["test"], probs["test"])
    if groups is not None:
        metrics["study_high_sensitivity"] = evaluate_studies(
            groups[va], labels["val"], probs["val"], groups[te], labels["test"], probs["test"],
            config.study_aggregate, config.target_sensitivity)
    return metrics, probs, labels


CONTEXT_INNER_FOLDS = 4
CONTEXT_NEEDS = "slice context needs patient IDs and slice numbers (a manifest with patient and slice columns)"


def check_context_usable(config: TrainConfig, dataset: Dataset) -> None:
    """Fail before any image is loaded when ``config.context`` cannot work on ``dataset``."""
    if config.context and not dataset.has_slice_order:
        raise DataError(f"{dataset.name}: {CONTEXT_NEEDS}")


def _fit_context(config: TrainConfig, frozen: FrozenFit, y: np.ndarray, split: Split, groups: np.ndarray,
                 order: np.ndarray) -> SliceContext:
    """The context model, fitted on out-of-fold head scores of the training patients.

    The head is refitted on inner patient folds of the training split (cached features, so
    seconds), each scoring the training patients it did not see.
    """
    tr = split.train
    n_folds = min(CONTEXT_INNER_FOLDS, len(set(groups[tr][y[tr] == 1])))
    if n_folds < 2:
        raise DataError("slice context needs at least 2 training patients with hemorrhage")
    oof = np.zeros(len(tr))
    folds = StratifiedGroupKFold(n_folds, shuffle=True, random_state=config.seed).split(tr, y[tr], groups[tr])
    for k, (inner, held) in enumerate(folds):
        oof[held] = frozen.refit(tr[inner], tr[held], k)
    return SliceContext.fit(oof, y[tr], groups[tr], order[tr])


def _context_metrics(config: TrainConfig, labels: dict, probs: dict, groups_val: np.ndarray,
                     groups_test: np.ndarray) -> dict:
    """The slice-context scores at the same operating points as the slice model's, prefixed context_."""
    pv, pt = probs["val_context"], probs["test_context"]
    m = {f"context_{k}": v for k, v in evaluate_split(labels["val"], pv, labels["test"], pt,
                                                       config.target_sensitivity).items()}
    ci = intervals(labels["test"], pt, groups_test,
                   {"default": 0.5, "high_sensitivity": m["context_high_sensitivity"]["threshold"]})
    m["context_intervals"] = ci
    m["context_study_high_sensitivity"] = evaluate_studies(
        groups_val, labels["val"], pv, groups_test, labels["test"], pt, config.study_aggregate,
        config.target_sensitivity)
    return m


def _source_metrics(config: TrainConfig, metrics: dict, labels: dict, probs: dict, sources: np.ndarray,
                    groups: np.ndarray | None) -> dict:
    """The test figures per source, at the thresholds validated on all sources together."""
    slice_t = metrics["high_sensitivity"]["threshold"]
    study_t = metrics["study_high_sensitivity"]["threshold"] if "study_high_sensitivity" in metrics else slice_t
    context = None
    if "test_context" in probs:
        context = (probs["test_context"], metrics["context_high_sensitivity"]["threshold"],
                   metrics["context_study_high_sensitivity"]["threshold"])
    return per_source(sources, labels["test"], probs["test"], slice_t, study_t, config.study_aggregate, groups,
                      context=context)


def _fit_images(
    model: keras.Model, config: TrainConfig, inputs: Loaded, split: Split, epochs: int, lr: float,
    cw: dict[int, float] | None, progress: bool, history: dict[str, list], phase: str,
) -> None:
    """Train ``model`` end to end on augmented images with a cosine-decayed rate."""
    steps = epochs * int(np.ceil(len(split.train) / config.batch_size))
    compile_classifier(model, keras.optimizers.schedules.CosineDecay(lr, steps))
    data = _image_batches(inputs.x[split.train], inputs.y[split.train], config.batch_size, config.seed, config.augment)
    h = model.fit(
        data, validation_data=(inputs.x[split.val].astype("float32"), inputs.y[split.val]), epochs=epochs,
        class_weight=cw, verbose=0, callbacks=epoch_progress(progress), shuffle=False,
    )
    _append(history, h.history, phase)


def check_split_usable(y: np.ndarray, split: Split) -> None:
    """Fail before training when a part is empty or validation/test lack a class."""
    for name in ("train", "val", "test"):
        part = y[getattr(split, name)]
        if len(part) == 0:
            raise DataError(f"the {name} split is empty (too few readable images or patients)")
        if len(set(part.tolist())) < 2:
            raise DataError(f"the {name} split has only one class; use more patients or another seed")


def unfreeze_top(backbone: keras.Model, first_layer_prefix: str) -> None:
    """Make the backbone trainable from the first layer named ``first_layer_prefix...`` on.

    Batch-norm layers stay frozen: their running statistics and scales come from ImageNet.
    """
    first = _first_layer(backbone, first_layer_prefix)
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= first and not is_bn


def _first_layer(backbone: keras.Model, prefix: str) -> int:
    for i, layer in enumerate(backbone.layers):
        if layer.name.startswith(prefix):
            return i
    raise ValueError(f"no backbone layer starts with {prefix!r}")


def predict_probabilities(model: keras.Model, x: np.ndarray, batch: int = 64) -> np.ndarray:
    return model.predict(x.astype("float32"), batch_size=batch, verbose=0).reshape(-1)


def write_run(
    out: Path,
    config: TrainConfig,
    dataset: Dataset,
    inputs: Loaded,
    split: Split,
    result: TrainResult,
    extra: dict | None = None,
    extra_sources: list[dict] = (),
) -> None:
    """Write config, model, history, metrics and plots of one run into folder ``out``.

    ``extra`` adds entries to config.json; ``extra_sources`` lists data the model learnt from beyond
    ``dataset`` (e.g. slices scored by a teacher), so the model card names their licences."""
    run = RunWriter(out)
    records = [dataset.records[i] for i in inputs.indices]
    meta = {
        "ichedge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_json(),
        "preprocessing": config.preprocessing.to_json(),
        "weights": result.weights.to_json(),
        "class_names": ["normal", "hemorrhage"],
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "windows": list(dataset.windows),
            "summary": dataset.summary(),
            "credit": dataset.credit,
            "sources": dataset.provenance() + list(extra_sources),
            "split_by": {"patient": "patient",
                         "near-duplicate cluster": "near-duplicate clusters (not patients: patients may leak)",
                         }.get(dataset.split_unit, "image (no patient IDs: patients may leak)"),
            "sizes": {k: int(len(getattr(split, k))) for k in ("train", "val", "test")},
            "skipped_images": inputs.errors,
        },
        "split": {k: [records[i].key for i in getattr(split, k)] for k in ("train", "val", "test")},
        "seconds": result.seconds,
    }
    if not result.weights.pretrained:
        meta["warning"] = f"RANDOM WEIGHTS: {result.weights.note}"
    meta.update(extra or {})
    run.config(meta)
    run.model(result.model)
    run.history(result.history)
    run.metrics(result.metrics)
    if result.context is not None:
        run.context(result.context)
    run.predictions(result.probabilities, result.labels)
    groups = patient_groups(dataset, inputs)  # the OOD boundary is set on held-out patients' distances
    run.reference(InputReference.fit(inputs.x[split.train], groups=None if groups is None else groups[split.train]).to_json())
    plot_history(result.history, run.plot("learning_curves"))
    hs = result.metrics["high_sensitivity"]
    plot_confusion(result.metrics["default"], run.plot("confusion_0.5"), "test, threshold 0.5")
    plot_confusion(hs, run.plot("confusion_high_sensitivity"),
                   f"test, threshold {hs['threshold']:.3f} (val sensitivity >= {config.target_sensitivity})")
    points = {"0.5": result.metrics["default"], "high-sensitivity": hs}
    plot_roc(result.labels["test"], result.probabilities["test"], points, run.plot("roc"))
    plot_pr(result.labels["test"], result.probabilities["test"], points, run.plot("precision_recall"))
    if "test_context" in result.probabilities:
        ctx = result.metrics["context_high_sensitivity"]
        plot_roc(result.labels["test"], result.probabilities["test_context"],
                 {"0.5": result.metrics["context_default"], "high-sensitivity": ctx}, run.plot("roc_context"))
    plot_reliability(result.labels["test"], result.probabilities["test"], run.plot("reliability"),
                     result.metrics["calibration"]["temperature"])
    write_run_report(out, meta, result.metrics)


def train(
    config: TrainConfig,
    dataset: Dataset,
    split: Split,
    runs_root: Path = Path("runs"),
    progress: bool = True,
    extract: Callable[[keras.Model, np.ndarray], np.ndarray] = compute_features,
) -> tuple[Path, TrainResult]:
    """Load, train, evaluate and write a new run folder; returns its path and the result.
    ``extract`` computes the frozen backbone's features (see :func:`fit`)."""
    check_no_patient_overlap(dataset, split)
    check_context_usable(config, dataset)
    inputs = load_inputs(dataset, config.preprocessing, progress=progress)
    local = remap_split(split, inputs.indices)
    result = fit(config, inputs, local, progress=progress, groups=patient_groups(dataset, inputs),
                 order=slice_order(dataset, inputs), sources=dataset.record_sources[inputs.indices], extract=extract)
    with new_folder(runs_root, config.name) as folder:
        write_run(folder.tmp, config, dataset, inputs, local, result)
    return folder.path, result


def remap_split(split: Split, kept: np.ndarray) -> Split:
    """Translate dataset indices to positions among the images that loaded (others dropped)."""
    pos = {int(i): p for p, i in enumerate(kept)}
    part = lambda idx: np.array([pos[int(i)] for i in idx if int(i) in pos], dtype=np.int64)  # noqa: E731
    return Split(part(split.train), part(split.val), part(split.test))
