"""Input size, feature layers and slice context: the frozen-feature ablations of issue 2
(an experiment, not a test).

On the full-resolution CT-ICH images (650x650 JPEGs, cropped to the head), with the 5 patient
folds `ichedge sweep --cv --data <labels.csv>` uses (seed 0): frozen ImageNet MobileNetV2
(alpha 0.35) features, a logistic regression (balanced, C=0.01) on the training patients, and
optionally the slice-context stage (`ichedge.context`) fitted on out-of-fold scores of the
training patients (4 inner patient folds). Prints test AUC (mean ± sd over folds), the mean
validation AUC (what a choice between rows may look at), and sensitivity / specificity at the
threshold chosen on validation for sensitivity >= 0.95. The last rows are the taps of ichedge's
multilevel head (`--head multilevel`), at three regularisation strengths, and with the head's own
fit (`ichedge.heads.fit_logistic`, which floors each channel's scale at its tap's int8 step).

    python bench/ablation_context.py [../shared/data/ct-ich/labels.csv]
"""

from __future__ import annotations

import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from common import (
    Head, at_validation_threshold, frozen_variants, head_crop_inputs, mean_sd, parser,
    patient_folds, read_data, scores,
)


def report(name: str, f, y, splits, groups, order, context: bool, head: Head | None = None) -> None:
    """One table row: test AUC over the folds, mean validation AUC, and test sensitivity and
    specificity at the validation threshold."""
    head = head or Head()
    aucs, vals, sens, spec = [], [], [], []
    for s in splits:
        p = scores(f, y, groups, order, head, s.train, [s.val, s.test], context)
        for out, value in zip((aucs, sens, spec), at_validation_threshold(y[s.val], p[s.val], y[s.test], p[s.test])):
            out.append(value)
        vals.append(roc_auc_score(y[s.val], p[s.val]))
    print(f"{name:<76} {mean_sd(aucs)}   val {np.mean(vals):.3f}   "
          f"sens {np.mean(sens):.3f}  spec {np.mean(spec):.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, data=True).parse_args(argv)
    ds = read_data(args.data)
    print(f"{'variant (frozen, alpha 0.35, head crop)':<76} test AUC (5 folds)  val AUC   hs sens / spec")
    for size in (160, 224, 288):
        loaded, y, groups, order = head_crop_inputs(ds, size)
        splits = patient_folds(ds, loaded.indices, seed=0)
        variants, span = frozen_variants(loaded.x, size)
        for layer, f in variants.items():
            report(f"{size}px {layer}", f, y, splits, groups, order, False)
            if size == 224:
                report(f"{size}px {layer} + slice context", f, y, splits, groups, order, True)
            if "block_13" in layer:
                for c in (0.003, 0.03):
                    report(f"  same, C = {c}", f, y, splits, groups, order, True, Head(c))
                report("  same, ichedge's int8-safe fit (fit_logistic)", f, y, splits, groups, order, True,
                       Head(map_range=span))
    return 0


if __name__ == "__main__":
    sys.exit(main())
