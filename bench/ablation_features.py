"""Frozen-feature ablations behind the README's accuracy notes (an experiment, not a test).

What changes the slice-level AUC of a frozen ImageNet MobileNetV2 (alpha 0.35) on the bundled
CT-ICH, on 5 patient-grouped folds (seed 0, the folds `ichedge sweep --cv` uses)? Each variant
fits a logistic regression (balanced class weights, C=0.01) on pooled features of the training
patients and scores the test patients of each fold. Prints mean ± sample sd over folds.

    python bench/ablation_features.py
"""

from __future__ import annotations

import sys

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from common import Head, backbone_maps, gap, gap_gmp, mean_sd, parser, patient_folds
from ichedge.data import load_bundled
from ichedge.explain import intracranial_mask
from ichedge.preprocess import Preprocessing, load_inputs

BATCH = 64  # this script's prediction batch (the others use 32)


def cv_auc(features: np.ndarray, y: np.ndarray, splits, c: float = 0.01) -> str:
    """Test AUC of the standardised, balanced logistic regression over the folds: mean ± sd."""
    aucs = []
    for s in splits:
        p = Head(c).scores(features, y, s.train, s.test)
        aucs.append(roc_auc_score(y[s.test], p[s.test]))
    return mean_sd(aucs)


def neighbours(ds, offset: int) -> np.ndarray:
    """For each slice, the index of the slice ``offset`` away in its patient (itself when there is none)."""
    index = {r.key: i for i, r in enumerate(ds.records)}
    return np.array([index.get(f"{r.patient}/{r.slice + offset}", i) for i, r in enumerate(ds.records)])


def main(argv: list[str] | None = None) -> int:
    parser(__doc__).parse_args(argv)
    ds = load_bundled(("brain", "bone"))
    splits = patient_folds(ds, seed=0)
    print(ds.summary(), "(slice 084_036, without a bone image, left out)")
    print(f"{'variant':<58} AUC (5 folds)")
    for size in (96, 160):
        for channels in ("gray", "brain-bone", "2.5d"):
            for crop in (False, True):
                loaded = load_inputs(ds, Preprocessing(size, channels, crop))
                assert len(loaded.indices) == len(ds)
                (f,) = backbone_maps(loaded.x, size, ("out_relu",), BATCH)
                print(f"{size}px {channels:<10} {'head crop' if crop else 'full frame':<10} GAP(out_relu)"
                      f"{'':<17} {cv_auc(gap(f), loaded.y, splits)}", flush=True)
    loaded = load_inputs(ds, Preprocessing(160, "brain-bone", True))
    y = loaded.y
    brain = np.repeat(loaded.x[..., :1], 3, -1)
    bone = np.repeat(loaded.x[..., 1:2], 3, -1)
    layers = ("block_13_expand_relu", "block_16_project_BN", "out_relu")
    outs = backbone_maps(brain, 160, layers, BATCH)
    for name, o in zip(layers, outs):
        print(f"160px gray crop {name:<22} GAP {'':<14} {cv_auc(gap(o), y, splits)}")
        print(f"160px gray crop {name:<22} GAP+GMP {'':<10} {cv_auc(gap_gmp(o), y, splits)}")
    fb = gap(outs[-1])
    (fo,) = [gap(o) for o in backbone_maps(bone, 160, ("out_relu",), BATCH)]
    prev, nxt = neighbours(ds, -1), neighbours(ds, 1)
    context = lambda f: (f[prev] + f[nxt]) / 2  # noqa: E731
    print(f"{'160px crop: brain and bone features side by side':<58} {cv_auc(np.c_[fb, fo], y, splits)}")
    print(f"{'160px crop: brain + neighbouring slices features':<58} {cv_auc(np.c_[fb, context(fb)], y, splits)}")
    both = np.c_[fb, fo, context(fb), context(fo)]
    print(f"{'160px crop: brain, bone + neighbours':<58} {cv_auc(both, y, splits)}")
    print(f"{'160px crop: brain, bone + neighbours, C=0.003':<58} {cv_auc(both, y, splits, 0.003)}")
    # Skull stripping: brain window zeroed outside the skull (bone-window ring; the head where
    # the ring is open), to see whether the features need what lies outside the brain.
    masks = []
    for b, br in zip(loaded.x[..., 1] / 255.0, loaded.x[..., 0]):
        inside, head = intracranial_mask(b), ndimage.binary_fill_holes(br > 20)
        masks.append(ndimage.binary_dilation(inside if inside.sum() >= 0.3 * max(head.sum(), 1) else head, iterations=2))
    stripped = np.repeat((loaded.x[..., :1] * np.array(masks)[..., None]).astype(np.uint8), 3, -1)
    (fs,) = [gap(o) for o in backbone_maps(stripped, 160, ("out_relu",), BATCH)]
    print(f"{'160px crop: skull-stripped brain window':<58} {cv_auc(fs, y, splits)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
