"""Longer fine-tuning with warm-up, and stronger augmentation (mixup, elastic): the last ideas of
issue 2 not measured before (an experiment, not a test).

Starts where `ichedge sweep --cv --head multilevel --fine-tune-epochs 10` starts: 224x224,
alpha 0.35, the full-resolution images cropped to the head, the multilevel head fitted on the
frozen features of each fold's training patients (ichedge's own `fit`). Then fine-tunes from
`block_13_expand` (batch-norm frozen, balanced class weights, ichedge's augmentation) under
each schedule below, from the same fitted start, on the 5 patient folds of `--seed 0`:

- ``ichedge``: 10 epochs, cosine decay from 1e-4 (what `--fine-tune-epochs 10` does);
- ``warmup``: 20 epochs, 2 of linear warm-up to 3e-4, then cosine decay;
- ``warmup+mixup``: the same, with stronger geometry (shift 0.10, rotation 0.08, zoom 0.10)
  and mixup (Beta(0.2, 0.2) pairs within a batch, the class weights mixed with the labels);
- ``elastic``: as ``ichedge``, with Keras's elastic deformation added.

Prints, per schedule: test slice AUC (mean ± sd over folds), mean validation AUC (what a
choice between schedules may look at), sensitivity and specificity at the threshold chosen on
validation for sensitivity >= 0.95, and seconds of fine-tuning per fold.

    python bench/finetune_schedule.py [labels.csv] [schedule ...]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
from sklearn.metrics import roc_auc_score

import keras

from common import at_validation_threshold, mean_sd, parser, patient_folds, read_data
from ichedge import training
from ichedge.preprocess import load_inputs, patient_groups
from ichedge.heads import class_weights
from ichedge.training import TrainConfig, fit, predict_probabilities, unfreeze_top


@dataclass(frozen=True)
class Schedule:
    epochs: int
    peak_lr: float
    warmup_epochs: int = 0
    strong: bool = False  # stronger geometry and mixup
    elastic: bool = False


# What `ichedge sweep --grid 224x0.35 --head multilevel` trains; its fine-tuning settings are the baseline's.
BASE = TrainConfig(size=224, alpha=0.35, head="multilevel")
SCHEDULES = {
    "ichedge": Schedule(10, BASE.fine_tune_lr),
    "warmup": Schedule(20, 3e-4, warmup_epochs=2),
    "warmup+mixup": Schedule(20, 3e-4, warmup_epochs=2, strong=True),
    "elastic": Schedule(10, BASE.fine_tune_lr, elastic=True),
}
MIXUP_ALPHA = 0.2
STRONGER = {
    keras.layers.RandomTranslation: lambda seed: keras.layers.RandomTranslation(0.10, 0.10, fill_mode="constant", seed=seed),
    keras.layers.RandomRotation: lambda seed: keras.layers.RandomRotation(0.08, fill_mode="constant", seed=seed),
}


def augmenter(schedule: Schedule, seed: int) -> keras.Sequential:
    """ichedge's augmentation, its shift and rotation made stronger with a zoom beside them, or
    elastic deformation added after them."""
    layers = list(training.augmenter(seed).layers)
    if schedule.strong:
        layers = [STRONGER[type(layer)](seed) if type(layer) in STRONGER else layer for layer in layers]
    after = 1 + max(i for i, layer in enumerate(layers) if type(layer) in STRONGER)
    extra = [keras.layers.RandomZoom(0.10, fill_mode="constant", seed=seed)] if schedule.strong else []
    if schedule.elastic:  # up to half the images, displacement field smoothed over 5% of the side
        extra.append(keras.layers.RandomElasticTransform(0.5, 1.0, fill_mode="constant", seed=seed))
    return keras.Sequential(layers[:after] + extra + layers[after:])


def batches(x: np.ndarray, y: np.ndarray, schedule: Schedule, seed: int) -> tf.data.Dataset:
    cw = class_weights(y)
    w = np.where(y == 1, cw[1], cw[0]).astype("float32")
    y = y.astype("float32")
    aug = augmenter(schedule, seed)
    data = tf.data.Dataset.from_tensor_slices((x, y, w)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(BASE.batch_size).map(lambda a, b, c: (tf.clip_by_value(aug(tf.cast(a, tf.float32), training=True), 0.0, 255.0), b, c))
    if schedule.strong:
        def mix(a, b, c):
            g1 = tf.random.gamma(tf.shape(b), MIXUP_ALPHA, seed=seed)
            g2 = tf.random.gamma(tf.shape(b), MIXUP_ALPHA, seed=seed + 1)
            lam = g1 / (g1 + g2)
            a2, b2, c2 = tf.reverse(a, [0]), tf.reverse(b, [0]), tf.reverse(c, [0])
            la = tf.reshape(lam, (-1, 1, 1, 1))
            return la * a + (1 - la) * a2, lam * b + (1 - lam) * b2, lam * c + (1 - lam) * c2
        data = data.map(mix)
    return data.prefetch(tf.data.AUTOTUNE)


def fine_tune(model: keras.Model, x: np.ndarray, y: np.ndarray, schedule: Schedule, seed: int) -> None:
    steps_per_epoch = int(np.ceil(len(x) / BASE.batch_size))
    warm = schedule.warmup_epochs * steps_per_epoch
    if warm:
        lr = keras.optimizers.schedules.CosineDecay(0.0, schedule.epochs * steps_per_epoch - warm,
                                                    warmup_target=schedule.peak_lr, warmup_steps=warm)
    else:
        lr = keras.optimizers.schedules.CosineDecay(schedule.peak_lr, schedule.epochs * steps_per_epoch)
    unfreeze_top(model.get_layer("backbone"), BASE.fine_tune_from)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
    model.fit(batches(x, y, schedule, seed), epochs=schedule.epochs, verbose=0, shuffle=False)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, data=True)
    ap.add_argument("schedules", nargs="*", metavar="schedule",
                    help=f"schedules to run, in this order (default: all of {', '.join(SCHEDULES)})")
    args = ap.parse_args(argv)
    unknown = [n for n in args.schedules if n not in SCHEDULES]
    if unknown:
        ap.error(f"unknown schedule(s) {', '.join(unknown)}; choose from {', '.join(SCHEDULES)}")
    names = args.schedules or list(SCHEDULES)
    ds = read_data(args.data)
    inputs = load_inputs(ds, BASE.preprocessing)
    groups = patient_groups(ds, inputs)
    rows: dict[str, list] = {n: [] for n in names}
    features = None
    for k, split in enumerate(patient_folds(ds, inputs.indices, seed=0)):
        start = fit(BASE, inputs, split, features=features, groups=groups)
        features = start.features
        fitted = {v.path: v.numpy() for v in start.model.weights}
        for name in names:
            keras.utils.set_random_seed(k)
            for v in start.model.weights:
                v.assign(fitted[v.path])
            began = time.perf_counter()
            fine_tune(start.model, inputs.x[split.train], inputs.y[split.train], SCHEDULES[name], seed=k)
            seconds = time.perf_counter() - began
            pv, pt = (predict_probabilities(start.model, inputs.x[i]) for i in (split.val, split.test))
            yv, yt = inputs.y[split.val], inputs.y[split.test]
            auc, sens, spec = at_validation_threshold(yv, pv, yt, pt)
            rows[name].append((auc, roc_auc_score(yv, pv), sens, spec, seconds))
            print(f"fold {k} {name:<14} test AUC {auc:.3f}  val AUC {rows[name][-1][1]:.3f}  "
                  f"sens {sens:.3f}  spec {spec:.3f}  {seconds:.0f} s "
                  f"(frozen start: test AUC {start.metrics['default']['auc']:.3f})", flush=True)
    print(f"{'schedule':<14} test AUC (5 folds)  val AUC  hs sens / spec   s per fold")
    for name, r in rows.items():
        a = np.array(r)
        print(f"{name:<14} {mean_sd(a[:, 0])}      {a[:, 1].mean():.3f}    "
              f"{a[:, 2].mean():.3f} / {a[:, 3].mean():.3f}   {a[:, 4].mean():.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
