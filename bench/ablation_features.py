"""Frozen-feature ablations behind the README's accuracy notes (an experiment, not a test).

What changes the slice-level AUC of a frozen ImageNet MobileNetV2 (alpha 0.35) on the bundled
CT-ICH, on 5 patient-grouped folds (seed 0, the folds `ichedge sweep --cv` uses)? Each variant
fits a logistic regression (balanced class weights, C=0.01) on pooled features of the training
patients and scores the test patients of each fold. Prints mean ± sample sd over folds.

    python bench/ablation_features.py
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import keras

from ichedge.data import kfold_splits, load_bundled
from ichedge.explain import intracranial_mask
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import Preprocessing, load_inputs

DS = load_bundled(("brain", "bone"))
SPLITS = kfold_splits(DS, 5, seed=0)


def cv_auc(features: np.ndarray, y: np.ndarray, c: float = 0.01) -> str:
    aucs = []
    for s in SPLITS:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
        clf.fit(features[s.train], y[s.train])
        aucs.append(roc_auc_score(y[s.test], clf.predict_proba(features[s.test])[:, 1]))
    return f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"


def backbone_outputs(x: np.ndarray, size: int, layers: tuple[str, ...]) -> list[np.ndarray]:
    backbone = build_model(0.35, size, resolve_weights(0.35, size)).get_layer("backbone")
    sub = keras.Model(backbone.input, [backbone.get_layer(n).output for n in layers])
    outs = sub.predict(x.astype("float32") / 127.5 - 1, batch_size=64, verbose=0)
    return outs if isinstance(outs, list) else [outs]


def neighbours(offset: int) -> np.ndarray:
    index = {r.key: i for i, r in enumerate(DS.records)}
    return np.array([index.get(f"{r.patient}/{r.slice + offset}", i) for i, r in enumerate(DS.records)])


def main() -> None:
    print(DS.summary(), "(slice 084_036, without a bone image, left out)")
    print(f"{'variant':<58} AUC (5 folds)")
    for size in (96, 160):
        for channels in ("gray", "brain-bone", "2.5d"):
            for crop in (False, True):
                loaded = load_inputs(DS, Preprocessing(size, channels, crop))
                assert len(loaded.indices) == len(DS)
                (f,) = backbone_outputs(loaded.x, size, ("out_relu",))
                print(f"{size}px {channels:<10} {'head crop' if crop else 'full frame':<10} GAP(out_relu)"
                      f"{'':<17} {cv_auc(f.mean((1, 2)), loaded.y)}", flush=True)
    loaded = load_inputs(DS, Preprocessing(160, "brain-bone", True))
    y = loaded.y
    brain = np.repeat(loaded.x[..., :1], 3, -1)
    bone = np.repeat(loaded.x[..., 1:2], 3, -1)
    layers = ("block_13_expand_relu", "block_16_project_BN", "out_relu")
    outs = backbone_outputs(brain, 160, layers)
    for name, o in zip(layers, outs):
        print(f"160px gray crop {name:<22} GAP {'':<14} {cv_auc(o.mean((1, 2)), y)}")
        print(f"160px gray crop {name:<22} GAP+GMP {'':<10} {cv_auc(np.c_[o.mean((1, 2)), o.max((1, 2))], y)}")
    fb = outs[-1].mean((1, 2))
    (fo,) = [o.mean((1, 2)) for o in backbone_outputs(bone, 160, ("out_relu",))]
    prev, nxt = neighbours(-1), neighbours(1)
    context = lambda f: (f[prev] + f[nxt]) / 2  # noqa: E731
    print(f"{'160px crop: brain and bone features side by side':<58} {cv_auc(np.c_[fb, fo], y)}")
    print(f"{'160px crop: brain + neighbouring slices features':<58} {cv_auc(np.c_[fb, context(fb)], y)}")
    both = np.c_[fb, fo, context(fb), context(fo)]
    print(f"{'160px crop: brain, bone + neighbours':<58} {cv_auc(both, y)}")
    print(f"{'160px crop: brain, bone + neighbours, C=0.003':<58} {cv_auc(both, y, 0.003)}")
    # Skull stripping: brain window zeroed outside the skull (bone-window ring; the head where
    # the ring is open), to see whether the features need what lies outside the brain.
    masks = []
    for b, br in zip(loaded.x[..., 1] / 255.0, loaded.x[..., 0]):
        inside, head = intracranial_mask(b), ndimage.binary_fill_holes(br > 20)
        masks.append(ndimage.binary_dilation(inside if inside.sum() >= 0.3 * max(head.sum(), 1) else head, iterations=2))
    stripped = np.repeat((loaded.x[..., :1] * np.array(masks)[..., None]).astype(np.uint8), 3, -1)
    (fs,) = [o.mean((1, 2)) for o in backbone_outputs(stripped, 160, ("out_relu",))]
    print(f"{'160px crop: skull-stripped brain window':<58} {cv_auc(fs, y)}")


if __name__ == "__main__":
    main()
