"""How optimistic is the multilevel head's choice of taps? A nested cross-validation (an
experiment for issue 2, not a test).

The taps of ``--head multilevel`` were chosen by mean validation AUC (with slice context) over
the standard folds, whose validation patients are other folds' test patients. Here each outer
fold chooses among the same candidates using its own development patients only (training plus
validation, 4 inner patient folds, mean inner AUC with context), then is trained and scored
exactly as ichedge's sweep does (fit on training, threshold on validation for sensitivity
>= 0.95, context fitted on out-of-fold training scores). The gap between the nested figures
and those of the fixed choice is the selection's optimism on these folds.

Features: frozen ImageNet MobileNetV2 (alpha 0.35) at 224x224 from the full-resolution images
cropped to the head; every candidate is GAP+GMP of ``block_16_project_BN`` plus GAP of the
named layers; a standardised, balanced logistic regression (C = 0.01). Fold seeds 0..4, the
folds of ``ichedge sweep --cv --seed S``.

    python bench/nested_selection.py [../shared/data/ct-ich/labels.csv]
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
from sklearn.metrics import roc_auc_score

from common import (
    Head, at_validation_threshold, backbone_maps, gap, gap_gmp, head_crop_inputs,
    inner_folds, parser, patient_folds, read_data, scores, seeds_meeting_target, slashed,
)

SEEDS = range(5)
CHOSEN = ("block_13_expand_relu",)  # ichedge's multilevel taps beside block_16
CANDIDATES: tuple[tuple[str, ...], ...] = (
    (), CHOSEN, ("block_12_add",), ("block_12_add", "block_15_add"), ("block_15_add",),
    ("block_14_expand",), ("block_16_expand",),
)


def pooled(x: np.ndarray) -> dict[str, np.ndarray]:
    """GAP of every candidate layer, and GAP+GMP of block_16_project_BN."""
    names = sorted({n for c in CANDIDATES for n in c})
    maps = backbone_maps(x, 224, names + ["block_16_project_BN"])
    out = {n: gap(m) for n, m in zip(names, maps)}
    out["block_16"] = gap_gmp(maps[-1])
    return out


def name(c: tuple[str, ...]) -> str:
    return " + ".join(("block_16 avg+max",) + c)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, data=True).parse_args(argv)
    ds = read_data(args.data)
    loaded, y, groups, order = head_crop_inputs(ds, 224)
    taps = pooled(loaded.x)
    feats = {c: np.concatenate([taps["block_16"]] + [taps[n] for n in c], axis=1) for c in CANDIDATES}
    head = Head()
    rows = {"fixed choice (ichedge's taps)": [], "nested choice": []}
    picks: Counter[str] = Counter()
    for seed in SEEDS:
        for key in rows:
            rows[key].append([])
        for split in patient_folds(ds, loaded.indices, seed=seed):
            dev = np.r_[split.train, split.val]
            inner_auc = {}
            for c, f in feats.items():
                aucs = [roc_auc_score(y[held], scores(f, y, groups, order, head, fit, [held], True)[held])
                        for fit, held in inner_folds(dev, y, groups)]
                inner_auc[c] = float(np.mean(aucs))
            best = max(CANDIDATES, key=inner_auc.get)
            picks[name(best)] += 1
            outer = {}
            for c in {CHOSEN, best}:  # ichedge's sweep: fit on training, threshold on validation
                p = scores(feats[c], y, groups, order, head, split.train, [split.val, split.test], True)
                outer[c] = at_validation_threshold(y[split.val], p[split.val], y[split.test], p[split.test])
            rows["fixed choice (ichedge's taps)"][-1].append(outer[CHOSEN])
            rows["nested choice"][-1].append(outer[best])
        print(f"seed {seed}: " + "  ".join(
            f"{k}: " + slashed(np.mean(v[-1], axis=0)) for k, v in rows.items()), flush=True)
    print("test AUC / sensitivity / specificity with context, mean over 5 folds, then over seeds:")
    for key, per_seed in rows.items():
        m = np.array([np.mean(s, axis=0) for s in per_seed])
        print(f"  {key:<32} {slashed(m.mean(0), ' / ')}   "
              f"target met on {seeds_meeting_target(m)}/{len(SEEDS)} seeds")
    print("taps chosen by the inner folds (outer folds x seeds):")
    for tap, n in picks.most_common():
        print(f"  {n:>2}  {tap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
