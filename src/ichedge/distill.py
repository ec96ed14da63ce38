"""Knowledge distillation into MobileNetV2 widths that have no ImageNet weights (alpha 0.1, 0.05).

Trained from scratch on a few hundred labelled slices, such students learn little and often
collapse to a constant output. A frozen ImageNet teacher (224x224, alpha 0.35, the ``multilevel``
logistic head) gives them two denser signals per image: its score (soft target) and where its
``block_13_expand_relu`` map is active (attention transfer, Zagoruyko & Komodakis 2017). Images
without labels (another hospital's slices) then count too, through the teacher's targets alone.

The teacher's backbone features carry no labels, so :func:`teacher_maps` computes them once for
every image; only its logistic head sees labels, and :func:`teacher_targets` fits it on one
fold's training rows. The student is the paper's model (:func:`ichedge.model.build_model`, head
``paper``), so it exports to int8 like any run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from ichedge.data import DataError, Dataset, Split, check_no_patient_overlap
from ichedge.evaluation import is_collapsed
from ichedge.heads import INT8_STEP_IMAGES, Taps, class_weights, fit_logistic, pool_name, tap_int8_steps
from ichedge.model import Weights, build_model, feature_extractor, resolve_weights
from ichedge.preprocess import Preprocessing, load_inputs, patient_groups
from ichedge.runs import new_folder
from ichedge.training import (TrainConfig, TrainResult, augmenter, check_split_usable, held_out_metrics, remap_split,
                              write_run)

log = logging.getLogger(__name__)

TEACHER_ALPHA = 0.35
TEACHER_SIZE = 224
# Stride 16 in both nets: 14x14 in the teacher at 224x224, 6x6 in a student at 96x96.
ATTENTION_LAYER = "block_13_expand_relu"
UNLABELLED = -1  # the label of an image that only the teacher scores


@dataclass(frozen=True)
class TeacherMaps:
    """What the frozen teacher backbone gives each image: no labels involved, so computed once.

    ``features``: the multilevel head's pooled taps; ``attention``: :func:`attention_map` of
    :data:`ATTENTION_LAYER` (not normalised)."""

    features: np.ndarray
    attention: np.ndarray


@dataclass(frozen=True)
class Targets:
    """The teacher's per-image targets for one fold: logit of its head and attention map."""

    logits: np.ndarray
    attention: np.ndarray

    @property
    def probabilities(self) -> np.ndarray:
        return 1 / (1 + np.exp(-self.logits))


@dataclass(frozen=True)
class DistillConfig:
    """A student's width and training; the losses' weights (``hard``, ``soft``, ``attention``)."""

    alpha: float
    size: int = 96
    epochs: int = 10
    learning_rate: float = 3e-3
    batch_size: int = 64
    temperature: float = 2.0
    hard: float = 1.0
    soft: float = 1.0
    attention: float = 2.0
    attention_layer: str = ATTENTION_LAYER
    neurons: int = 8
    dropout: float = 0.1
    augment: bool = True
    class_weight: bool = True
    seed: int = 0


def build_teacher(seed: int = 0) -> keras.Model:
    """The 224x224 alpha-0.35 ImageNet MobileNetV2 with the multilevel head (head not yet fitted)."""
    weights = resolve_weights(TEACHER_ALPHA, TEACHER_SIZE)
    if not weights.pretrained:
        raise RuntimeError(f"the teacher needs ImageNet weights: {weights.note}")
    return build_model(TEACHER_ALPHA, TEACHER_SIZE, weights, seed=seed, head="multilevel")


def attention_map(activations: tf.Tensor | np.ndarray) -> tf.Tensor:
    """Channel mean of squared activations, (n, h, w, c) -> (n, h, w): where a layer responds."""
    return tf.reduce_mean(tf.square(tf.convert_to_tensor(activations, tf.float32)), axis=-1)


def normalised(maps: tf.Tensor | np.ndarray) -> tf.Tensor:
    """Attention maps flattened and scaled to unit L2 norm: only where, not how strongly, counts."""
    flat = tf.reshape(tf.convert_to_tensor(maps, tf.float32), (tf.shape(maps)[0], -1))
    return tf.math.l2_normalize(flat, axis=1, epsilon=1e-12)


def resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Attention maps (n, h, w) averaged down (area) to the student's map size."""
    if tuple(maps.shape[1:3]) == tuple(size):
        return np.asarray(maps, np.float32)
    return tf.image.resize(np.asarray(maps, np.float32)[..., None], size, method="area").numpy()[..., 0]


def attention_loss(student: tf.Tensor, teacher: tf.Tensor) -> tf.Tensor:
    """Squared distance of the normalised maps per image (0 when alike, at most 2)."""
    return tf.reduce_sum(tf.square(normalised(student) - normalised(teacher)), axis=1)


def soft_loss(teacher_logits: tf.Tensor, student_logits: tf.Tensor, temperature: float = 1.0) -> tf.Tensor:
    """Binary KL divergence of the student's from the teacher's tempered probability, times T^2
    (Hinton et al.: keeps its gradients on the hard loss's scale); 0 where they agree."""
    t = tf.convert_to_tensor(teacher_logits, tf.float32) / temperature
    s = tf.convert_to_tensor(student_logits, tf.float32) / temperature
    p = tf.sigmoid(t)
    kl = (p * (tf.math.log_sigmoid(t) - tf.math.log_sigmoid(s))
          + (1 - p) * (tf.math.log_sigmoid(-t) - tf.math.log_sigmoid(-s)))
    return kl * temperature**2


def teacher_maps(teacher: keras.Model, x: np.ndarray, batch: int = 32) -> TeacherMaps:
    """The frozen teacher's pooled taps and attention map of every image ``x`` (uint8 pixels)."""
    amap = teacher.get_layer(pool_name(ATTENTION_LAYER, "avg")).input  # the backbone's map, as the head reads it
    both = keras.Model(teacher.input, [feature_extractor(teacher).output, amap])
    features, maps = both.predict(x.astype("float32"), batch_size=batch, verbose=0)
    return TeacherMaps(features, attention_map(maps).numpy())


def teacher_targets(teacher: keras.Model, maps: TeacherMaps, y: np.ndarray, train: np.ndarray,
                    x_train: np.ndarray, seed: int = 0, balanced: bool = True) -> Targets:
    """The teacher's targets for every row of ``maps`` from a head fitted on rows ``train`` only.

    As :class:`ichedge.heads.MultilevelHead` fits it: int8-safe logistic regression whose tap
    steps come from ``INT8_STEP_IMAGES`` seeded training images (``x_train`` holds the images of
    rows ``train``, in order). Only ``y[train]`` is read, so no other label reaches the targets.
    """
    train = np.asarray(train)
    sample = np.sort(np.random.default_rng(seed).permutation(len(train))[:INT8_STEP_IMAGES])
    head = teacher.get_layer("head")
    taps = Taps([int(t.shape[-1]) for t in head.inputs], tap_int8_steps(teacher, x_train[sample]))
    w, b = fit_logistic(maps.features[train], y[train], taps, balanced)
    return Targets((maps.features @ w + b).astype(np.float32), maps.attention)


class _Trainer:
    """The student's forward pass in training mode: its logit and the map the attention term reads.

    Shares every layer with the plain student, so training this trains the exported model.
    """

    def __init__(self, student: keras.Model, layer: str) -> None:
        backbone = student.get_layer("backbone")
        self.taps = keras.Model(backbone.input, [backbone.output, backbone.get_layer(layer).output])
        self.rescale, self.pool = student.get_layer("rescale"), student.get_layer("pool")
        head = student.get_layer("head")
        self.dense, self.dropout, self.out = head.get_layer("dense"), head.get_layer("dropout"), head.get_layer("hemorrhage")

    def __call__(self, x: tf.Tensor, training: bool) -> tuple[tf.Tensor, tf.Tensor]:
        last, inner = self.taps(self.rescale(x), training=training)
        h = self.dropout(self.dense(self.pool(last)), training=training)
        return tf.squeeze(tf.matmul(h, self.out.kernel) + self.out.bias, -1), attention_map(inner)


def _batches(x: np.ndarray, y: np.ndarray, targets: Targets, config: DistillConfig) -> tf.data.Dataset:
    data = tf.data.Dataset.from_tensor_slices((x, y.astype("float32"), targets.logits, targets.attention))
    data = data.shuffle(len(x), seed=config.seed, reshuffle_each_iteration=True).batch(config.batch_size)
    if not config.augment:
        return data.map(lambda a, *rest: (tf.cast(a, tf.float32), *rest)).prefetch(tf.data.AUTOTUNE)
    # Flips are drawn here so the teacher's map flips with its image; the package augmenter's small
    # shifts and rotations (under a cell of a 6x6 map) are left to move the image alone.
    rest = keras.Sequential(augmenter(config.seed).layers[1:], name="augment")
    rng = tf.random.Generator.from_seed(config.seed)

    def augment(a, b, logit, att):
        flip = rng.uniform((tf.shape(a)[0],)) < 0.5
        a = tf.cast(a, tf.float32)
        a = tf.where(flip[:, None, None, None], tf.reverse(a, [2]), a)
        att = tf.where(flip[:, None, None], tf.reverse(att, [2]), att)
        return tf.clip_by_value(rest(a, training=True), 0.0, 255.0), b, logit, att

    return data.map(augment).prefetch(tf.data.AUTOTUNE)


def fit_student(config: DistillConfig, x: np.ndarray, y: np.ndarray, targets: Targets,
                validation: tuple[np.ndarray, np.ndarray] | None = None,
                log: bool = False) -> tuple[keras.Model, dict[str, list]]:
    """Train a student from random weights on images ``x`` (uint8) with the distillation loss.

    ``y`` holds 0/1 labels, :data:`UNLABELLED` where the image counts through the teacher only;
    ``targets`` are the teacher's for the same rows (attention maps at any size: averaged down to
    the student's). Loss per batch: ``hard`` x class-weighted cross-entropy on the labelled rows
    + ``soft`` x :func:`soft_loss` + ``attention`` x :func:`attention_loss` on every row. Returns
    the plain student and its per-epoch history (loss terms, seconds, and ``val_auc`` with
    ``validation``)."""
    keras.utils.set_random_seed(config.seed)
    student = build_model(config.alpha, config.size, Weights("random", note="distilled student, trained from scratch"),
                          config.neurons, config.dropout, config.seed, head="paper")
    trainer = _Trainer(student, config.attention_layer)
    side = tuple(int(d) for d in student.get_layer("backbone").get_layer(config.attention_layer).output.shape[1:3])
    targets = Targets(np.asarray(targets.logits, np.float32), resize_maps(targets.attention, side))
    labelled = y != UNLABELLED
    cw = class_weights(y[labelled]) if config.class_weight else {0: 1.0, 1: 1.0}
    steps = config.epochs * int(np.ceil(len(x) / config.batch_size))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(config.learning_rate, steps))
    variables = student.trainable_variables
    optimizer.build(variables)

    @tf.function
    def step(a, b, logit, att):
        with tf.GradientTape() as tape:
            z, maps = trainer(a, training=True)
            known = tf.cast(b >= 0, tf.float32)
            label = tf.maximum(b, 0.0)
            weight = known * (cw[0] * (1 - label) + cw[1] * label)
            bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=label, logits=z)
            hard = tf.reduce_sum(weight * bce) / tf.maximum(tf.reduce_sum(known), 1.0)
            soft = tf.reduce_mean(soft_loss(logit, z, config.temperature))
            att_term = tf.reduce_mean(attention_loss(maps, att))
            loss = config.hard * hard + config.soft * soft + config.attention * att_term
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return tf.stack([loss, hard, soft, att_term])

    data = _batches(x, y, targets, config)
    history: dict[str, list] = {}
    for epoch in range(config.epochs):
        start = time.perf_counter()
        terms = np.mean([step(*batch).numpy() for batch in data], axis=0)
        for name, value in zip(("loss", "hard", "soft", "attention"), terms):
            history.setdefault(name, []).append(float(value))
        history.setdefault("seconds", []).append(time.perf_counter() - start)
        if validation is not None:
            p = student.predict(validation[0].astype("float32"), batch_size=128, verbose=0).reshape(-1)
            history.setdefault("val_auc", []).append(float(roc_auc_score(validation[1], p)))
        if log:
            print(f"  epoch {epoch + 1}/{config.epochs}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in history.items()),
                  flush=True)
    return student, history


# --- a distilled student, written as a run folder ------------------------------------------------


def distill(config: DistillConfig, dataset: Dataset, split: Split, unlabelled: Dataset | None = None,
            unlabelled_count: int = 1500, runs_root: Path = Path("runs"),
            progress: bool = False) -> tuple[Path, TrainResult]:
    """Distil a student on ``split`` of ``dataset``, evaluate it on the test patients at thresholds
    chosen on validation, and write a run folder (``ichedge export`` and ``profile`` take it as any run).

    The teacher's head sees the training patients' labels only. ``unlabelled`` adds up to
    ``unlabelled_count`` of its slices (seeded) through the teacher's targets alone; they are listed
    with their licence among the run's training sources, so the model card carries it.
    """
    check_no_patient_overlap(dataset, split)
    train_config = TrainConfig(size=config.size, alpha=config.alpha, neurons=config.neurons, dropout=config.dropout,
                               epochs=config.epochs, learning_rate=config.learning_rate, batch_size=config.batch_size,
                               augment=config.augment, class_weight=config.class_weight, weights="random",
                               seed=config.seed)
    teacher_pre = Preprocessing(size=TEACHER_SIZE)
    inputs = load_inputs(dataset, train_config.preprocessing, progress=progress)
    local = remap_split(split, inputs.indices)
    check_split_usable(inputs.y, local)
    x, y = inputs.x, inputs.y.astype("float32")
    x_teacher = load_inputs(dataset, teacher_pre, indices=inputs.indices).x
    extra_sources: list[dict] = []
    if unlabelled is not None:
        chosen = np.sort(np.random.default_rng(config.seed).permutation(len(unlabelled))[:unlabelled_count])
        more = load_inputs(unlabelled, train_config.preprocessing, indices=chosen, progress=progress)
        x = np.concatenate([x, more.x])
        x_teacher = np.concatenate([x_teacher, load_inputs(unlabelled, teacher_pre, indices=more.indices).x])
        y = np.concatenate([y, np.full(len(more.x), UNLABELLED, "float32")])
        extra_sources = [{**source, "slices": len(more.x), "role": "unlabelled: teacher scores only"}
                         for source in unlabelled.provenance()]
    if len(x_teacher) != len(x):
        raise DataError(f"{dataset.name}: a slice read at {config.size} px could not be read at {TEACHER_SIZE} px")
    started = time.perf_counter()
    teacher = build_teacher(config.seed)
    maps = teacher_maps(teacher, x_teacher)
    targets = teacher_targets(teacher, maps, y, local.train, x_teacher[local.train], config.seed)
    rows = np.concatenate([local.train, np.arange(len(inputs.x), len(x))])
    student, history = fit_student(config, x[rows], y[rows], Targets(targets.logits[rows], targets.attention[rows]),
                                   validation=(inputs.x[local.val], inputs.y[local.val]), log=progress)
    history["phase"] = ["distilled"] * config.epochs
    seconds = {"distill": time.perf_counter() - started}
    metrics, probs, labels = held_out_metrics(train_config, student, inputs, local, patient_groups(dataset, inputs))
    extra = {"distillation": {
        "config": asdict(config), "unlabelled_slices": int(len(x) - len(inputs.x)),
        "teacher": f"MobileNetV2 {TEACHER_SIZE}x{TEACHER_SIZE} alpha {TEACHER_ALPHA:g} (ImageNet, frozen), multilevel "
                   "head fitted on this run's training patients"}}
    if is_collapsed(probs["test"]):
        extra["warning"] = "COLLAPSED MODEL: the student's test outputs are near-constant; it has not learnt"
        log.warning("%s: %s", train_config.name, extra["warning"])
    weights = Weights("random", note="distilled student: random initial weights, trained with a teacher's targets")
    result = TrainResult(student, weights, history, metrics, probs, labels, seconds)
    with new_folder(runs_root, f"{train_config.name}-distilled") as folder:
        write_run(folder.tmp, train_config, dataset, inputs, local, result, extra, extra_sources)
    return folder.path, result
