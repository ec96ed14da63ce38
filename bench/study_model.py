"""A study-level model: does a model fitted over a study's slice scores (or slice features) rank
and flag studies better than the top-3 mean? (Issue 15, item 6.)

`make best` (224x224, alpha 0.35, the multilevel head with ichedge's int8-safe fit, slice
context) scores slices at AUC about 0.91, but its top-3 study score only about 0.86. Measured
here, on the frozen multilevel taps of the full-resolution CT-ICH images and the 5 patient folds
of ``ichedge sweep --cv --seed S`` (S = 0..4), each of these study scores over the slice head's
probabilities and over the context stage's:

- fixed aggregates: max, top-3 mean (ichedge's default: the baseline), mean, noisy-OR;
- pooling with one parameter chosen by study AUC on the training studies: log-sum-exp of the
  slice logits (sharpness r), attention (softmax(b * logit)-weighted mean logit), and a
  smoothed maximum over neighbouring slices (the maximum of [a, 1, a]-weighted logits in slice
  order);
- learned: a balanced logistic regression over the sorted top-5 logits and simple statistics of
  the study (mean, sd, log slice count, share of slices above 0.5, longest run of them, best
  3-slice window); a 1D convolution (width 3) over the slice-order logit sequence, pooled by
  log-sum-exp, fitted by balanced log loss;
- over pooled slice features instead of scores: a balanced logistic regression on each
  patient's max-pooled (or mean- and max-pooled) multilevel taps.

Protocol, nested so no study model sees a score from a model fitted on its patient: inside each
outer fold, the slice head (and context) is refitted on 4 inner patient folds of the training
patients to give their out-of-fold slice scores; the study models are fitted on those training
studies only. The validation and test patients are scored by the head (and context) fitted on
all training patients, then by the study model. The study threshold is the highest whose
sensitivity on the validation studies is 1.0 (7 or 8 positive patients), applied unchanged to
the test studies. Prints, per fold seed (means over its 5 folds), validation and test study AUC,
test sensitivity / specificity at that threshold, and test specificity at a threshold set on
the test studies themselves for sensitivity 1.0 (a bound on what any threshold could give, not
an operating point); then the mean over the seeds with how many seeds each model beats the slice
top-3 on, the top-3 at a threshold set on the training studies' out-of-fold scores instead, and
the positive patients the top-3 ranks lowest. The frozen features and each seed's slice scores
are cached in /tmp/ichedge-study-cache (a rerun takes about 2 minutes; delete it after changing
the head, the context stage or the folds, which its keys do not cover).

    python bench/study_model.py [../shared/data/ct-ich/labels.csv] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import (
    MULTILEVEL, Head, at_threshold, frozen_variants, head_crop_inputs, inner_folds, parser, patient_folds,
    read_data,
)
from ichedge.context import SliceContext
from ichedge.studies import study_score

CACHE = Path("/tmp/ichedge-study-cache")
EPS = 1e-6


# Features, cached


def cached_features(path: str):
    """The manifest, a key naming its version, and the multilevel taps, block_16 map ranges,
    labels, patients, slice order and loaded indices of its images at 224x224 (computed once,
    then read from CACHE)."""
    ds = read_data(path)
    stat = Path(path).resolve().stat()
    key = hashlib.sha1(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    file = CACHE / f"multilevel-224-{key}.npz"
    if not file.exists():
        loaded, y, groups, order = head_crop_inputs(ds, 224)
        variants, span = frozen_variants(loaded.x, 224)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(file, f=variants[MULTILEVEL], span=span, y=y, groups=np.asarray(groups).astype(str),
                 order=order, indices=loaded.indices)
    z = np.load(file)
    return ds, key, z["f"], z["span"], z["y"], z["groups"], z["order"], z["indices"]


# Slice scores


def slice_and_context(f, y, groups, order, head: Head, fit: np.ndarray, rest: np.ndarray) -> dict[str, np.ndarray]:
    """Slice-head and context probabilities of ``rest`` (zero elsewhere) from a head fitted on
    ``fit``; the context model is fitted on out-of-fold head scores of ``fit``, as ichedge does."""
    p = head.scores(f, y, fit, rest)
    oof = np.zeros(len(y))
    for inner, held in inner_folds(fit, y, groups):
        oof[held] = head.scores(f, y, inner, held)[held]
    ctx = SliceContext.fit(oof[fit], y[fit], groups[fit], order[fit])
    c = np.zeros(len(y))
    c[rest] = ctx.apply(p[rest], groups[rest], order[rest])
    return {"slice": p, "context": c}


# Studies


@dataclass(frozen=True)
class Study:
    """One patient: the logits of the scores being pooled, the slice head's and the context
    stage's logits, and the slice features, all in slice order."""

    z: np.ndarray
    slice: np.ndarray
    context: np.ndarray
    f: np.ndarray


@dataclass(frozen=True)
class Studies:
    names: np.ndarray
    items: list[Study]
    y: np.ndarray


def logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def studies(idx: np.ndarray, p: dict[str, np.ndarray], source: str, f: np.ndarray, y: np.ndarray,
            groups: np.ndarray, order: np.ndarray) -> Studies:
    """The studies of the slices ``idx``, pooling ``p[source]``, in patient order."""
    names = np.unique(groups[idx])
    members = [idx[groups[idx] == g] for g in names]
    members = [m[np.argsort(order[m], kind="stable")] for m in members]
    z = {k: logits(v) for k, v in p.items()}
    return Studies(names, [Study(z[source][m], z["slice"][m], z["context"][m], f[m]) for m in members],
                   np.array([y[m].max() for m in members]))


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def lse(z: np.ndarray, r: float) -> float:
    """Log-sum-exp pooling, (1/r) log mean exp(r z): the mean at r -> 0, the maximum at r -> inf."""
    return float((np.logaddexp.reduce(r * z) - np.log(len(z))) / r)


def attention(z: np.ndarray, b: float) -> float:
    w = np.exp(b * (z - z.max()))
    return float(w @ z / w.sum())


def neighbours(z: np.ndarray, a: float) -> np.ndarray:
    """Each slice's logit with its neighbours' weighted by ``a`` (the ends repeat the end slice)."""
    padded = np.r_[z[0], z, z[-1]]
    return (a * padded[:-2] + padded[1:-1] + a * padded[2:]) / (1 + 2 * a)


def topk(z: np.ndarray, k: int) -> np.ndarray:
    s = np.sort(z)[::-1]
    return np.r_[s, np.full(max(0, k - len(s)), s[-1])][:k]


def summary(z: np.ndarray) -> np.ndarray:
    """The learned logistic's inputs: top-5 logits, mean, sd, log slice count, share above 0.5,
    longest run above 0.5 and the best 3-slice window."""
    above = z > 0
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, above.astype(int), 0])))[::2]
    return np.r_[topk(z, 5), z.mean(), z.std(), np.log(len(z)), above.mean(),
                 runs.max() if runs.size else 0, neighbours(z, 1.0).max()]


# Study models: fit(training studies) -> self, score(studies) -> one score per study


class Fixed:
    def __init__(self, fn: Callable[[np.ndarray], float]) -> None:
        self.fn = fn

    def fit(self, s: Studies) -> Fixed:
        return self

    def score(self, s: Studies) -> np.ndarray:
        return np.array([self.fn(x.z) for x in s.items])


def aggregate(method: str) -> Fixed:
    """ichedge's own aggregate of the slice probabilities."""
    return Fixed(lambda z: study_score(sigmoid(z), method))


class Chosen:
    """A pooling with one parameter, the first of ``grid`` with the best training study AUC."""

    def __init__(self, fn: Callable[[np.ndarray, float], float], grid: tuple[float, ...]) -> None:
        self.fn, self.grid, self.param = fn, grid, grid[0]

    def fit(self, s: Studies) -> Chosen:
        aucs = [roc_auc_score(s.y, [self.fn(x.z, g) for x in s.items]) for g in self.grid]
        self.param = self.grid[int(np.argmax(aucs))]
        return self

    def score(self, s: Studies) -> np.ndarray:
        return np.array([self.fn(x.z, self.param) for x in s.items])


class Logistic:
    """A standardised, balanced logistic regression over per-study vectors."""

    def __init__(self, vector: Callable[[Study], np.ndarray], c: float) -> None:
        self.vector, self.c = vector, c

    def rows(self, s: Studies) -> np.ndarray:
        return np.array([self.vector(x) for x in s.items])

    def fit(self, s: Studies) -> Logistic:
        lr = LogisticRegression(C=self.c, max_iter=5000, class_weight="balanced")
        self.model = make_pipeline(StandardScaler(), lr).fit(self.rows(s), s.y)
        return self

    def score(self, s: Studies) -> np.ndarray:
        return self.model.predict_proba(self.rows(s))[:, 1]


class Conv1D:
    """A width-3 convolution over the slice-order logits, log-sum-exp pooled (r = 4), plus a
    bias; fitted by balanced log loss with an L2 pull of the kernel towards [0, 1, 0]."""

    def __init__(self, l2: float = 0.1) -> None:
        self.l2, self.w = l2, np.array([0.0, 1.0, 0.0, 0.0])

    @staticmethod
    def pooled(w: np.ndarray, z: np.ndarray) -> float:
        padded = np.r_[z[0], z, z[-1]]
        return lse(w[0] * padded[:-2] + w[1] * padded[1:-1] + w[2] * padded[2:], 4.0) + w[3]

    def fit(self, s: Studies) -> Conv1D:
        weight = np.where(s.y == 1, 0.5 / s.y.mean(), 0.5 / (1 - s.y.mean()))
        prior = np.array([0.0, 1.0, 0.0])

        def loss(w: np.ndarray) -> float:
            q = np.clip(sigmoid(np.array([self.pooled(w, x.z) for x in s.items])), EPS, 1 - EPS)
            nll = -np.mean(weight * (s.y * np.log(q) + (1 - s.y) * np.log(1 - q)))
            return float(nll + self.l2 * np.sum((w[:3] - prior) ** 2))

        self.w = minimize(loss, self.w, method="L-BFGS-B").x
        return self

    def score(self, s: Studies) -> np.ndarray:
        return np.array([self.pooled(self.w, x.z) for x in s.items])


# Pooling one source's scores (the slice head's or the context stage's)
MODELS: dict[str, Callable[[], object]] = {
    "top3 (baseline)": lambda: aggregate("top3"),
    "max": lambda: aggregate("max"),
    "mean": lambda: aggregate("mean"),
    "noisy-OR": lambda: Fixed(lambda z: float(np.logaddexp(0, z).sum())),  # -log P(no slice bleeds)
    "log-sum-exp (r chosen)": lambda: Chosen(lse, (0.5, 1.0, 2.0, 4.0, 8.0)),
    "attention (b chosen)": lambda: Chosen(attention, (0.5, 1.0, 2.0, 4.0)),
    "smoothed max over neighbours (a chosen)": lambda: Chosen(lambda z, a: float(neighbours(z, a).max()),
                                                             (0.0, 0.25, 0.5, 1.0)),
    "logistic over top-5 + statistics (C 0.1)": lambda: Logistic(lambda x: summary(x.z), 0.1),
    "logistic over top-5 + statistics (C 1)": lambda: Logistic(lambda x: summary(x.z), 1.0),
    "1D conv over slice order": Conv1D,
}
# Models over both sources, or over slice features
JOINT_MODELS: dict[str, Callable[[], object]] = {
    "both: logistic over slice and context top-3 and mean (C 1)": lambda: Logistic(
        lambda x: np.r_[topk(x.slice, 3).mean(), x.slice.mean(), topk(x.context, 3).mean(), x.context.mean()], 1.0),
    "features: max-pooled taps, logistic (C 0.01)": lambda: Logistic(lambda x: x.f.max(0), 0.01),
    "features: mean + max-pooled taps, logistic (C 0.01)": lambda: Logistic(lambda x: np.r_[x.f.mean(0), x.f.max(0)], 0.01),
}
BASELINE = "slice: top3 (baseline)"


def evaluate(model, train: Studies, val: Studies, test: Studies) -> np.ndarray:
    """Fit ``model`` on the training studies; return validation study AUC, test study AUC, test
    sensitivity and specificity at the threshold set on the validation studies, test specificity
    at the threshold set on the test studies themselves (a bound, not an operating point), and
    test sensitivity and specificity at the threshold set on the training studies' out-of-fold
    scores (in-sample for a learned model). Every threshold is the highest that flags all the
    positive studies it is set on: sensitivity 1.0 there."""
    model.fit(train)
    sr, sv, st = model.score(train), model.score(val), model.score(test)
    _, sens, spec = at_threshold(test.y, st, sv[val.y == 1].min())
    _, sens_oof, spec_oof = at_threshold(test.y, st, sr[train.y == 1].min())
    oracle = np.mean(st[test.y == 0] < st[test.y == 1].min())
    return np.array([roc_auc_score(val.y, sv), roc_auc_score(test.y, st), sens, spec, oracle, sens_oof, spec_oof])


def fold_scores(f, span, y, groups, order, split) -> dict[str, np.ndarray]:
    """One outer fold's slice scores: of the validation and test patients from the head (and
    context) fitted on the training patients ("outer_*"), and of the training patients out of
    fold, from heads (and contexts) fitted on 4 inner folds of them ("oof_*")."""
    head = Head(map_range=span)
    train = split.train
    outer = slice_and_context(f, y, groups, order, head, train, np.r_[split.val, split.test])
    out = {f"outer_{k}": p for k, p in outer.items()} | {f"oof_{k}": np.zeros(len(y)) for k in outer}
    for inner, held in inner_folds(train, y, groups, seed=1):
        for k, p in slice_and_context(f, y, groups, order, head, inner, held).items():
            out[f"oof_{k}"][held] = p[held]
    return out


def cached_scores(key: str, seed: int, f, span, y, groups, order, splits: list) -> list[dict[str, np.ndarray]]:
    """:func:`fold_scores` of every outer fold of a fold seed (computed once, then read from CACHE)."""
    file = CACHE / f"scores-{key}-seed{seed}.npz"
    if not file.exists():
        folds = [fold_scores(f, span, y, groups, order, split) for split in splits]
        np.savez(file, **{f"{k}_{i}": v for i, fold in enumerate(folds) for k, v in fold.items()})
    z = np.load(file)
    return [{k: z[f"{k}_{i}"] for k in ("outer_slice", "outer_context", "oof_slice", "oof_context")}
            for i in range(len(splits))]


def outer_fold(scores: dict[str, np.ndarray], f, y, groups, order, split) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Every model's figures on one outer fold (rows keyed "input: model", as :func:`evaluate`),
    and for each positive test patient, the share of negative test patients whose baseline
    score is at least as high as its own."""
    oof = {k: scores[f"oof_{k}"] for k in ("slice", "context")}
    outer = {k: scores[f"outer_{k}"] for k in ("slice", "context")}
    out = {}
    for source in ("slice", "context"):
        parts = [studies(idx, p, source, f, y, groups, order)
                 for idx, p in ((split.train, oof), (split.val, outer), (split.test, outer))]
        for name, make in MODELS.items():
            out[f"{source}: {name}"] = evaluate(make(), *parts)
    for name, make in JOINT_MODELS.items():
        out[name] = evaluate(make(), *parts)
    test = studies(split.test, outer, "slice", f, y, groups, order)
    st = aggregate("top3").score(test)
    above = {g: float(np.mean(st[test.y == 0] >= v)) for g, v, t in zip(test.names, st, test.y) if t}
    return out, above


def table(rows: dict[str, np.ndarray], beats: dict[str, tuple[int, int]] | None = None) -> str:
    """Markdown, means over folds: validation study AUC, test study AUC, sensitivity and
    specificity at the validation threshold, and the oracle specificity; with ``beats``, on how
    many seeds each row's validation and test AUC are above the baseline's."""
    head = ("| study model | val study AUC | test study AUC | test sensitivity | test specificity "
            "| test specificity at test sensitivity 1.0 (oracle) |")
    rule = "|---|---|---|---|---|---|"
    if beats is not None:
        head += " seeds above slice top3 (val / test AUC) |"
        rule += "---|"
    lines = [head, rule]
    for name, v in rows.items():
        cells = f"| {name} | " + " | ".join(f"{x:.3f}" for x in v[:5]) + " |"
        if beats is not None:
            cells += f" {beats[name][0]} / {beats[name][1]} |"
        lines.append(cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, data=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(5)), help="fold seeds (default 0 1 2 3 4)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    ds, key, f, span, y, groups, order, indices = cached_features(args.data)
    print(f"features ready in {time.perf_counter() - start:.0f} s", flush=True)
    per_seed: dict[int, dict[str, np.ndarray]] = {}
    above: dict[str, list[float]] = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        splits = patient_folds(ds, indices, seed=seed)
        scores = cached_scores(key, seed, f, span, y, groups, order, splits)
        folds = [outer_fold(fs, f, y, groups, order, split) for fs, split in zip(scores, splits)]
        per_seed[seed] = {k: np.mean([rows[k] for rows, _ in folds], axis=0) for k in folds[0][0]}
        for _, shares in folds:
            for g, v in shares.items():
                above.setdefault(g, []).append(v)
        print(f"\nfold seed {seed} (means over 5 patient folds; {time.perf_counter() - t0:.0f} s)\n", flush=True)
        print(table(per_seed[seed]), flush=True)
    keys = list(per_seed[args.seeds[0]])
    mean = {k: np.mean([per_seed[s][k] for s in args.seeds], axis=0) for k in keys}
    beats = {k: tuple(sum(per_seed[s][k][i] > per_seed[s][BASELINE][i] for s in args.seeds) for i in (0, 1))
             for k in keys}
    print(f"\nmean over fold seeds {', '.join(map(str, args.seeds))} ({time.perf_counter() - start:.0f} s in all)\n")
    print(table(mean, beats))
    print("\nwhere the top3 study threshold comes from (sensitivity 1.0 there; test figures, mean over seeds)\n")
    print("| scores | threshold set on | test sensitivity | test specificity |\n|---|---|---|---|")
    for k in (BASELINE, BASELINE.replace("slice", "context")):
        print(f"| {k.split(':')[0]} | validation studies | {mean[k][2]:.3f} | {mean[k][3]:.3f} |")
        print(f"| {k.split(':')[0]} | out-of-fold training studies | {mean[k][5]:.3f} | {mean[k][6]:.3f} |")
    hardest = sorted(above, key=lambda g: -np.mean(above[g]))[:5]
    print("\npositive patients the slice top3 ranks lowest (mean share of their test fold's negative patients "
          "scoring at least as high): " + ", ".join(f"{g} {np.mean(above[g]):.2f}" for g in hardest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
