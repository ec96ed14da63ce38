"""Does telling the model where the bleed is help? An attention head with and without mask supervision.

Usage: python bench/mask_supervision.py [--ct-ich MANIFEST] [--phe MANIFEST] [--cache DIR]

Both heads read the frozen ImageNet MobileNetV2's block_13_expand_relu map (alpha 0.35,
224x224 head crop: 14x14 cells of 192 channels, the map Grad-CAM explains for ichedge's
multilevel head), cached on disk as float16. The head: a 1x1 convolution to 64 channels (ReLU),
a 1x1 convolution to one attention logit per cell, a softmax over the 196 cells, the
attention-weighted mean of the 64 channels, dropout 0.2, Dense(1) -> logit. Loss: class-weighted
binary cross-entropy; the supervised variant adds LAMBDA times the cross-entropy between the
attention and the slice's mask (ichedge.localisation.prepared_mask, convex hull, averaged over
each 16x16 cell and normalised to sum 1), on PHE slices with a mask only (CT-ICH's masks are not
in the copy here). Both variants share the seed, initial weights and batch order; every setting
(64 channels, dropout, LAMBDA, EPOCHS, learning rate) was fixed before the run, none tuned.

Folds: 5 folds over patients of CT-ICH and PHE-SICH together, stratified by source and slice
label (StratifiedGroupKFold, seed 0); each fold trains on 4/5 of the patients of both hospitals
and is scored on the held-out CT-ICH and PHE patients. Reported: slice AUC per source (the
folds' held-out slices pooled, 95% patient-bootstrap interval; mean ± sd over folds), and on
the held-out PHE masked slices the pointing game and mass ratio (ichedge.localisation) of the
attention map and of Grad-CAM on the cached map, both upsampled bilinearly to 224x224; and the
paired patient-bootstrap difference (supervised - not) of the pointing game.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import StratifiedGroupKFold

from ichedge.data import read_manifest
from ichedge.evaluation import bootstrap_ci, rank_auc
from ichedge.heads import class_weights
from ichedge.localisation import TOLERANCE, localisation, prepared_mask
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import Preprocessing, load_inputs

DEFAULT_CT_ICH = "../shared/data/ct-ich/labels.csv"
DEFAULT_PHE = "../shared/data/phe-sich/labels.csv"
DEFAULT_CACHE = "/tmp/ichedge-loc-cache"
SIZE, ALPHA, LAYER, CELL = 224, 0.35, "block_13_expand_relu", 16  # 224 / 14
WIDTH, DROPOUT, LAMBDA, EPOCHS, LR, BATCH = 64, 0.2, 1.0, 20, 1e-3, 64
FOLDS, SEED, N_BOOT = 5, 0, 1000
CHUNK = 256  # images loaded and passed through the backbone at a time


# --- the cache ----------------------------------------------------------------------------------


def cache_source(ds, name: str, cache: Path) -> dict[str, np.ndarray]:
    """Feature maps (float16, memory-mapped), labels, patients, and for slices with a mask its
    224x224 prepared mask; computed once, then read from ``cache``."""
    maps_file, meta_file = cache / f"{name}_{LAYER}_{SIZE}.npy", cache / f"{name}_meta.npz"
    pre = Preprocessing(SIZE, "gray", True)
    if not meta_file.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        backbone = build_model(ALPHA, SIZE, resolve_weights(ALPHA, SIZE)).get_layer("backbone")
        sub = keras.Model(backbone.input, backbone.get_layer(LAYER).output)
        maps = None
        for chunk in np.array_split(np.arange(len(ds)), max(1, len(ds) // CHUNK)):
            loaded = load_inputs(ds, pre, chunk)
            if loaded.errors:
                raise SystemExit(f"unreadable images, e.g. {loaded.errors[0]}")
            out = sub.predict(loaded.x.astype("float32") / 127.5 - 1, batch_size=32, verbose=0)
            if maps is None:
                maps = np.lib.format.open_memmap(maps_file, "w+", np.float16, (len(ds), *out.shape[1:]))
            maps[chunk] = out.astype(np.float16)
        maps.flush()
        masked = np.array([i for i, r in enumerate(ds.records) if r.label == 1 and r.mask is not None], np.int64)
        masks = np.stack([prepared_mask(ds.records[i], pre) for i in masked]) if len(masked) else \
            np.zeros((0, SIZE, SIZE), bool)
        np.savez_compressed(meta_file, y=ds.labels, groups=np.array([f"{name}:{g}" for g in ds.groups]),
                            masked=masked, masks=masks)
    with np.load(meta_file) as meta:
        data = {k: meta[k] for k in meta.files}
    data["maps"] = np.load(maps_file, mmap_mode="r")
    return data


def cell_targets(masks: np.ndarray) -> np.ndarray:
    """Each mask's share of every 16x16 cell, normalised to sum 1 over the 196 cells."""
    n = len(masks)
    cells = masks.reshape(n, SIZE // CELL, CELL, SIZE // CELL, CELL).mean((2, 4)).reshape(n, -1)
    return (cells / np.maximum(cells.sum(1, keepdims=True), 1e-9)).astype(np.float32)


# --- the head -----------------------------------------------------------------------------------


def attention_head(channels: int) -> keras.Model:
    """Feature map (14, 14, C) -> (logit, attention logits over the 196 cells)."""
    maps = keras.Input((SIZE // CELL, SIZE // CELL, channels), name="maps")
    h = keras.layers.Conv2D(WIDTH, 1, activation="relu", name="embed")(maps)
    scores = keras.layers.Reshape((-1,), name="cells")(keras.layers.Conv2D(1, 1, name="attention")(h))
    weights = keras.layers.Softmax(name="softmax")(scores)
    pooled = keras.layers.Dot(axes=1, name="pool")([weights, keras.layers.Reshape((-1, WIDTH))(h)])
    logit = keras.layers.Dense(1, name="logit")(keras.layers.Dropout(DROPOUT)(pooled))
    return keras.Model(maps, [logit, scores], name="attention_head")


def train_head(maps: np.ndarray, y: np.ndarray, targets: np.ndarray, train: np.ndarray, supervised: bool,
               seed: int) -> keras.Model:
    """Fit on rows ``train``; ``targets`` (N, 196) all zero for a slice without a mask."""
    keras.utils.set_random_seed(seed)
    model = attention_head(maps.shape[-1])
    optimiser = keras.optimizers.Adam(LR)
    cw = class_weights(y[train])
    weight = np.array([cw[int(c)] for c in y], np.float32)
    has = (targets.sum(1) > 0).astype(np.float32)
    lam = LAMBDA if supervised else 0.0

    @tf.function(reduce_retracing=True)
    def step(f, yb, wb, tb, hb):
        with tf.GradientTape() as tape:
            logit, scores = model(f, training=True)
            logit = logit[:, 0]
            cls = tf.reduce_sum(wb * tf.nn.sigmoid_cross_entropy_with_logits(yb, logit)) / tf.reduce_sum(wb)
            ce = -tf.reduce_sum(tb * tf.nn.log_softmax(scores), -1)
            loss = cls + lam * tf.reduce_sum(hb * ce) / tf.maximum(tf.reduce_sum(hb), 1.0)
        grads = tape.gradient(loss, model.trainable_variables)
        optimiser.apply_gradients(zip(grads, model.trainable_variables))

    rng = np.random.default_rng(seed)
    for _ in range(EPOCHS):
        for batch in np.array_split(rng.permutation(train), max(1, len(train) // BATCH)):
            batch = np.sort(batch)  # memory-mapped rows read in order
            step(tf.constant(maps[batch].astype(np.float32)), tf.constant(y[batch]),
                 tf.constant(weight[batch]), tf.constant(targets[batch]), tf.constant(has[batch]))
    return model


def probabilities(model: keras.Model, maps: np.ndarray, rows: np.ndarray) -> np.ndarray:
    logits = [model(maps[batch].astype(np.float32), training=False)[0].numpy()[:, 0]
              for batch in np.array_split(rows, max(1, len(rows) // 256))]
    return 1 / (1 + np.exp(-np.concatenate(logits)))


def heatmaps(model: keras.Model, maps: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention maps and Grad-CAM maps (on the input map, as ichedge's GradCAM does on the
    backbone's), both upsampled bilinearly to 224x224."""
    attention, cams = [], []
    for batch in np.array_split(rows, max(1, len(rows) // 128)):
        f = tf.constant(maps[batch].astype(np.float32))
        with tf.GradientTape() as tape:
            tape.watch(f)
            logit, scores = model(f, training=False)
        grads = tape.gradient(logit, f)
        cam = tf.nn.relu(tf.reduce_sum(f * tf.reduce_mean(grads, (1, 2), keepdims=True), -1, keepdims=True))
        att = tf.reshape(tf.nn.softmax(scores), (-1, SIZE // CELL, SIZE // CELL, 1))
        attention.append(tf.image.resize(att, (SIZE, SIZE), "bilinear")[..., 0].numpy())
        cams.append(tf.image.resize(cam, (SIZE, SIZE), "bilinear")[..., 0].numpy())
    return np.concatenate(attention), np.concatenate(cams)


# --- the measurement ----------------------------------------------------------------------------


def paired(difference: Callable[[np.ndarray], float], groups: np.ndarray, seed: int = SEED) -> str:
    """``difference`` of the rows given (supervised - not) on all rows, with a 95% interval
    over patients resampled with replacement, both variants on the same draws."""
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    boot = [difference(np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))]))
            for _ in range(N_BOOT)]
    low, high = np.nanquantile(boot, [0.025, 0.975])
    return f"{difference(np.arange(len(groups))):+.3f} ({low:+.3f} to {high:+.3f})"


def cell(summary: dict) -> str:
    return f"{summary['value']:.3f} ({summary['low']:.3f}-{summary['high']:.3f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ct-ich", default=DEFAULT_CT_ICH, help=f"CT-ICH manifest (default: {DEFAULT_CT_ICH})")
    ap.add_argument("--phe", default=DEFAULT_PHE, help=f"PHE-SICH manifest with masks (default: {DEFAULT_PHE})")
    ap.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE),
                    help=f"where the feature maps are cached (default: {DEFAULT_CACHE})")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    sources = {}
    for name, path in (("ct-ich", args.ct_ich), ("phe", args.phe)):
        ds = read_manifest(path)
        print(ds.summary())
        sources[name] = cache_source(ds, name, args.cache)
    print(f"features cached: {time.perf_counter() - start:.0f} s")
    ct, phe = sources["ct-ich"], sources["phe"]
    # In memory as float16: 5,979 maps of 14x14x192 are 450 MB.
    maps = np.concatenate([np.asarray(ct["maps"]), np.asarray(phe["maps"])])
    y = np.concatenate([ct["y"], phe["y"]]).astype(np.float32)
    groups = np.concatenate([ct["groups"], phe["groups"]])
    source = np.repeat([0, 1], [len(ct["y"]), len(phe["y"])])
    masked = len(ct["y"]) + phe["masked"]
    targets = np.zeros((len(y), (SIZE // CELL) ** 2), np.float32)
    targets[masked] = cell_targets(phe["masks"])

    variants = ("without mask loss", "with mask loss")
    probs = {v: np.zeros(len(y)) for v in variants}
    fold_auc: dict[str, dict[str, list[float]]] = {v: {"ct-ich": [], "phe": []} for v in variants}
    heat = {(v, kind): np.zeros((len(masked), SIZE, SIZE), np.float16) for v in variants for kind in ("attention", "grad-cam")}
    splitter = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=SEED)
    for k, (train, test) in enumerate(splitter.split(y, (source * 2 + y).astype(int), groups)):
        fold_start = time.perf_counter()
        test_masked = np.flatnonzero(np.isin(masked, test))
        for v in variants:
            model = train_head(maps, y, targets, train, v == variants[1], SEED + k)
            probs[v][test] = probabilities(model, maps, test)
            att, cam = heatmaps(model, maps, masked[test_masked])
            heat[(v, "attention")][test_masked] = att
            heat[(v, "grad-cam")][test_masked] = cam
            for s, name in enumerate(("ct-ich", "phe")):
                rows = test[source[test] == s]
                fold_auc[v][name].append(rank_auc(y[rows].astype(int), probs[v][rows]))
        print(f"fold {k}: {len(train)} training slices, {len(test)} held out "
              f"({len(test_masked)} PHE masked); {time.perf_counter() - fold_start:.0f} s")

    loc = {key: localisation(h, phe["masks"], groups[masked], TOLERANCE, N_BOOT, SEED) for key, h in heat.items()}
    print(f"\nHeld-out patients, {FOLDS} folds pooled; 95% intervals resample patients ({N_BOOT} draws)\n")
    print("| | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for s, name in enumerate(("ct-ich", "phe")):
        rows = source == s
        cells = []
        for v in variants:
            ci = bootstrap_ci(y[rows].astype(int), probs[v][rows], groups[rows], 0.5, N_BOOT, SEED)["auc"]
            cells.append(f"{ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f}); folds "
                         f"{np.mean(fold_auc[v][name]):.3f} ± {np.std(fold_auc[v][name], ddof=1):.3f}")
        print(f"| {name} slice AUC | " + " | ".join(cells) + " |")
    for kind in ("attention", "grad-cam"):
        for key, label in (("pointing", "pointing game, 0 px"), ("pointing_tolerance", f"pointing game, {TOLERANCE} px"),
                           ("mass_ratio", "mass ratio")):
            print(f"| PHE {kind}: {label} | " + " | ".join(cell(loc[(v, kind)]["summary"][key]) for v in variants) + " |")
    base = loc[(variants[0], "attention")]
    print(f"\nPHE masked slices measured: {base['n_slices']} ({base['n_patients']} patients); "
          f"peak at the centre: {cell(base['summary']['centre'])}; chance (mask's share of the frame): "
          f"{cell(base['summary']['area_share'])}; within {TOLERANCE} px: {cell(base['summary']['area_share_tolerance'])}")
    print("\nWith - without mask loss, paired (95% interval, patients resampled):")
    for s, name in enumerate(("ct-ich", "phe")):
        rows = source == s
        yb, pa, pb = y[rows].astype(int), probs[variants[1]][rows], probs[variants[0]][rows]
        print(f"- {name} slice AUC: {paired(lambda i: rank_auc(yb[i], pa[i]) - rank_auc(yb[i], pb[i]), groups[rows])}")
    for kind in ("attention", "grad-cam"):
        a, b = (loc[(v, kind)]["per_slice"]["hit"].astype(float) for v in (variants[1], variants[0]))
        measured = groups[masked][loc[(variants[0], kind)]["index"]]
        print(f"- PHE {kind}: pointing game, 0 px: {paired(lambda i: np.mean(a[i] - b[i]), measured)}")
    print(f"total: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
