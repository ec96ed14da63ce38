"""Where the high-sensitivity threshold comes from: the validation split, or out-of-fold scores
of all development patients (an experiment for issue 2, not a test).

ichedge fits on a fold's training patients and sets the threshold on its validation patients
(15 to 18 of them, 7 or 8 with hemorrhage), so the threshold moves with a handful of slices.
The alternative measured here fits on training and validation patients together and sets the
threshold on out-of-fold scores of all of them (4 inner patient folds; with context, the
context model of each inner fold is itself fitted on that fold's own out-of-fold scores, so no
score that sets the threshold comes from a model that saw its patient).

Features: the frozen multilevel taps at 224x224 (ichedge's ``--head multilevel``, full-resolution
images cropped to the head), fitted as ichedge fits them (``fit_logistic`` with the taps' int8
steps, here taken over all fitting images). The same 5 patient folds as
``ichedge sweep --cv --seed S`` for S = 0..4. Prints, per protocol and fold seed, test AUC,
sensitivity and specificity at the threshold (mean over the 5 folds), and how many seeds meet
issue 2's target (AUC >= 0.90, sensitivity >= 0.90, specificity >= 0.70).

    python bench/threshold_protocol.py [../shared/data/ct-ich/labels.csv]
"""

from __future__ import annotations

import sys

import numpy as np

from common import (
    MULTILEVEL, TARGET, Head, at_threshold, frozen_variants, head_crop_inputs, inner_folds,
    parser, patient_folds, read_data, scores, seeds_meeting_target, slashed,
)
from ichedge.evaluation import threshold_for_sensitivity

SEEDS = range(5)


def fold(f, y, groups, order, head: Head, split, protocol: str, context: bool) -> tuple[float, float, float]:
    """Test AUC, sensitivity and specificity of one fold under a threshold protocol."""
    test = split.test
    if protocol == "validation":
        p = scores(f, y, groups, order, head, split.train, [split.val, test], context)
        t = threshold_for_sensitivity(y[split.val], p[split.val], TARGET)
    else:
        dev = np.r_[split.train, split.val]
        p = scores(f, y, groups, order, head, dev, [test], context)
        held_scores = np.zeros(len(y))
        for inner, held in inner_folds(dev, y, groups, seed=1):
            held_scores[held] = scores(f, y, groups, order, head, inner, [held], context)[held]
        t = threshold_for_sensitivity(y[dev], held_scores[dev], TARGET)
    return at_threshold(y[test], p[test], t)


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, data=True).parse_args(argv)
    ds = read_data(args.data)
    loaded, y, groups, order = head_crop_inputs(ds, 224)
    variants, span = frozen_variants(loaded.x, 224)
    f, head = variants[MULTILEVEL], Head(map_range=span)
    splits = {s: patient_folds(ds, loaded.indices, seed=s) for s in SEEDS}
    print(f"multilevel taps, 224x224, int8-safe fit; threshold for sensitivity >= {TARGET}; "
          "test AUC / sensitivity / specificity, mean over 5 patient folds")
    for context in (False, True):
        for protocol, label in (("validation", "validation"), ("out-of-fold", "out-of-fold (fit on train + validation)")):
            per_seed = np.array([np.mean([fold(f, y, groups, order, head, k, protocol, context)
                                          for k in splits[s]], axis=0) for s in SEEDS])
            met = seeds_meeting_target(per_seed)
            cells = "  ".join(f"s{s} {slashed(row)}" for s, row in zip(SEEDS, per_seed))
            print(f"{'context' if context else 'slice':<8} {label:<40} {cells}  "
                  f"mean {slashed(per_seed.mean(0))}  target met on {met}/{len(SEEDS)} seeds", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
