"""On-site acceptance: re-choose a model's thresholds on a site's own labelled patients.

A model's thresholds were chosen on the training hospital's validation patients; another
hospital's scanner, reconstruction and windowing move its scores. Before go-live a site scores
a small labelled sample of its own patients with the runtime it will run (``ichedge calibrate``)
and gets, for a target sensitivity, the highest slice and study thresholds whose *one-sided
lower confidence bound* on sensitivity reaches the target, so the promise is one the sample
can support:

- studies: patients are independent units, so the bound is the exact (Clopper-Pearson) lower
  bound on the share of positive patients flagged;
- slices: slices of one patient are correlated, so a binomial bound over slices would be far
  too tight. The bound is the (1 - confidence) quantile of a seeded bootstrap that resamples
  the positive patients whole, capped at the Clopper-Pearson bound of all positive patients
  flagged: no bound can promise more than the number of independent patients allows, and a
  bootstrap of a sample where everything is flagged would say 1.0 at any size.

With k of n positive patients flagged the exact bound is (1 - confidence) ** (1 / n) at best
(k = n), so 0.90 at 95 % needs 29 positive patients; a smaller sample is refused with that
number (:class:`InsufficientSample`). Specificity is measured on the sample's negatives, where
it has any. :func:`calibrate` is the pure core; :func:`calibrate_site` scores a dataset and
writes the site profile into the run folder (:meth:`ichedge.runs.RunFolder.write_site_profile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy.stats import beta

from ichedge import __version__
from ichedge.data import DataError, read_dataset
from ichedge.model import sha256
from ichedge.preprocess import load_inputs, patient_groups
from ichedge.runs import EXPORT_MODELS, SITE_PROFILES, RunFolder, check_site_name
from ichedge.runtimes import KerasPredictor, Predictor
from ichedge.studies import DEFAULT_AGGREGATE, study_arrays

DEFAULT_SITE = "local"
DEFAULT_SENSITIVITY, DEFAULT_CONFIDENCE = 0.90, 0.95
N_BOOT = 2000
BACKENDS = (*reversed(EXPORT_MODELS), KerasPredictor.kind)  # int8 first: what a site runs by default


class InsufficientSample(DataError):
    """Too few positive patients to promise the target sensitivity at the confidence asked."""

    def __init__(self, message: str, needed: int, have: int) -> None:
        super().__init__(message)
        self.needed, self.have = needed, have


def clopper_pearson_lower(k: int, n: int, confidence: float) -> float:
    """One-sided exact lower confidence bound on a proportion from ``k`` successes in ``n`` trials."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if k == 0:
        return 0.0
    if k == n:  # closed form, so it agrees exactly with positives_needed
        return (1 - confidence) ** (1 / n)
    return float(beta.ppf(1 - confidence, k, n - k + 1))


def positives_needed(target: float, confidence: float) -> int:
    """The fewest positive patients whose best result (all flagged) has a lower bound >= ``target``."""
    n = 1
    while clopper_pearson_lower(n, n, confidence) < target:
        n += 1
    return n


def slice_sensitivity_lower(y: np.ndarray, p: np.ndarray, groups: Sequence[str], thresholds: np.ndarray,
                            confidence: float, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Bootstrap lower bound of slice sensitivity at each threshold: the (1 - confidence) quantile
    over ``n_boot`` resamples of the positive patients, each with all its slices. The same draws
    serve every threshold, so the bound falls as the threshold rises."""
    y, p, groups = np.asarray(y).astype(bool), np.asarray(p, np.float64), np.asarray(groups).astype(str)
    thresholds = np.asarray(thresholds, np.float64)
    patients = np.unique(groups[y])
    if not len(patients):
        raise ValueError("no positive slices to bound a sensitivity on")
    # hits[i, j]: patient i's positive slices scoring >= thresholds[j]; sizes[i]: its positive slices
    hits = np.array([(p[y & (groups == g)][:, None] >= thresholds).sum(0) for g in patients], np.float64)
    sizes = np.array([(y & (groups == g)).sum() for g in patients], np.float64)
    weights = np.random.default_rng(seed).multinomial(len(patients), np.full(len(patients), 1 / len(patients)),
                                                      size=n_boot).astype(np.float64)
    sensitivity = (weights @ hits) / (weights @ sizes)[:, None]
    return np.quantile(sensitivity, 1 - confidence, axis=0)


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it gives on the sample: sensitivity, its one-sided lower bound, and
    specificity (None where the sample has no negatives at that level)."""

    threshold: float
    sensitivity: float
    lower_bound: float
    specificity: float | None

    def to_json(self) -> dict:
        return asdict(self)


def _point(labels: np.ndarray, scores: np.ndarray, threshold: float, lower: float) -> OperatingPoint:
    negatives = scores[labels == 0]
    return OperatingPoint(float(threshold), float((scores[labels == 1] >= threshold).mean()), float(lower),
                          float((negatives < threshold).mean()) if len(negatives) else None)


@dataclass(frozen=True)
class Calibration:
    """Thresholds chosen on a site's sample, what the shipped thresholds give there, and the counts."""

    target: float
    confidence: float
    study_aggregate: str
    slice: OperatingPoint
    study: OperatingPoint
    shipped_slice: OperatingPoint | None
    shipped_study: OperatingPoint | None
    counts: dict[str, int]
    notes: list[str]
    n_boot: int
    seed: int

    @property
    def methods(self) -> dict[str, str]:
        return {"slice": f"one-sided patient-cluster percentile bootstrap (positive patients resampled whole, "
                         f"{self.n_boot} draws, seed {self.seed}), capped at the Clopper-Pearson bound of all "
                         "positive patients flagged",
                "study": "one-sided exact (Clopper-Pearson) bound over positive patients"}


def calibrate(y: np.ndarray, p: np.ndarray, groups: Sequence[str], aggregate: str = DEFAULT_AGGREGATE,
              target: float = DEFAULT_SENSITIVITY, confidence: float = DEFAULT_CONFIDENCE,
              shipped: tuple[float, float] | None = None, n_boot: int = N_BOOT, seed: int = 0) -> Calibration:
    """The highest slice and study thresholds whose lower ``confidence`` bound on sensitivity
    reaches ``target``, from slice labels ``y``, scores ``p`` and patients ``groups``; a study
    is a patient, scored by ``aggregate``. ``shipped`` (slice, study) thresholds are measured
    the same way for comparison. Raises :class:`InsufficientSample` when even flagging every
    positive patient cannot reach the target."""
    if not 0 < target < 1 or not 0 < confidence < 1:
        raise ValueError(f"sensitivity and confidence must be between 0 and 1, got {target} and {confidence}")
    y, p, groups = np.asarray(y).astype(int), np.asarray(p, np.float64), np.asarray(groups).astype(str)
    if not len(y) == len(p) == len(groups):
        raise ValueError(f"{len(y)} labels, {len(p)} scores and {len(groups)} patients: one of each per slice")
    study_y, study_s = study_arrays(groups, y, p, aggregate)
    have, needed = int(study_y.sum()), positives_needed(target, confidence)
    if have < needed:
        best = clopper_pearson_lower(have, have, confidence) if have else 0.0
        raise InsufficientSample(
            f"{have} positive patient(s) cannot support sensitivity >= {target:g} at {confidence:.0%} confidence: "
            f"even flagging all of them the one-sided lower bound is {best:.3f}; at least {needed} positive patients "
            f"are needed (the sample has {have})", needed, have)
    cap = clopper_pearson_lower(have, have, confidence)

    # Studies: the fewest flagged positives k whose bound reaches the target; the highest
    # threshold flagging k of them is the k-th highest positive score.
    k = next(k for k in range(1, have + 1) if clopper_pearson_lower(k, have, confidence) >= target)
    positive_scores = np.sort(study_s[study_y == 1])[::-1]

    def study_point(t: float) -> OperatingPoint:
        return _point(study_y, study_s, t, clopper_pearson_lower(int((positive_scores >= t).sum()), have, confidence))

    # Slices: every positive slice score is a candidate, highest first; the bound falls with the
    # threshold and is `cap` at the lowest, which reaches the target since have >= needed.
    candidates = np.unique(p[y == 1])[::-1]
    extra = [] if shipped is None else [shipped[0]]
    bounds = np.minimum(slice_sensitivity_lower(y, p, groups, np.r_[candidates, extra], confidence, n_boot, seed), cap)
    chosen = int(np.argmax(bounds[:len(candidates)] >= target))

    counts = {"slices": len(y), "positive_slices": int(y.sum()), "negative_slices": int((y == 0).sum()),
              "patients": len(study_y), "positive_patients": have, "negative_patients": int((study_y == 0).sum())}
    notes = []
    if not counts["negative_slices"]:
        notes.append("slice specificity not measurable: the sample has no slice without a bleed")
    if not counts["negative_patients"]:
        notes.append("study specificity not measurable: every patient in the sample has a bleed; measure it on "
                     "patients without one before go-live")
    return Calibration(
        target, confidence, aggregate, _point(y, p, candidates[chosen], bounds[chosen]),
        study_point(float(positive_scores[k - 1])),
        None if shipped is None else _point(y, p, shipped[0], bounds[-1]),
        None if shipped is None else study_point(shipped[1]), counts, notes, n_boot, seed)


def format_calibration(cal: Calibration) -> list[str]:
    """What ``ichedge calibrate`` prints: the chosen operating points, and the shipped ones on this sample."""
    c = cal.counts

    def point(level: str, unit: str, pt: OperatingPoint) -> str:
        spec = f"{pt.specificity:.3f}" if pt.specificity is not None else f"not measurable (no {unit} without a bleed)"
        return (f"{level} threshold {pt.threshold:.4f}: sensitivity {pt.sensitivity:.3f} (lower bound "
                f"{pt.lower_bound:.3f}), specificity {spec}")

    lines = [f"sample: {c['patients']} patients ({c['positive_patients']} with a bleed, {c['negative_patients']} "
             f"without), {c['slices']} slices ({c['positive_slices']} with a bleed)",
             f"target: sensitivity >= {cal.target:g}, one-sided {cal.confidence:.0%} lower bound",
             "  " + point("slice", "slices", cal.slice) + " [patient-cluster bootstrap]",
             "  " + point("study", "patients", cal.study) + f" [{cal.study_aggregate} of slices; Clopper-Pearson]"]
    if cal.shipped_slice is not None and cal.shipped_study is not None:
        lines += ["shipped thresholds on this sample:", "  " + point("slice", "slices", cal.shipped_slice),
                  "  " + point("study", "patients", cal.shipped_study)]
    return lines + [f"  note: {n}" for n in cal.notes]


# --- scoring a site's sample and writing its profile ------------------------------------------


@dataclass
class SiteCalibration:
    """A calibration, the site profile written from it, and where."""

    calibration: Calibration
    profile: dict
    path: Path


def calibration_model(model: str | Path, backend: str | None = None) -> tuple[RunFolder, Path]:
    """The run folder and the model file to calibrate: a model file as given, or from a run folder
    the ``backend``'s (default: the int8 export where there is one, as ``serve``, else Keras)."""
    path = Path(model)
    if not path.exists():
        raise DataError(f"{path}: model not found")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    if path.is_dir():
        run = RunFolder.open(path)
        backend = backend or ("int8" if run.exports() else KerasPredictor.kind)
        return run, run.model_file if backend == KerasPredictor.kind else run.latest_export().model_file(backend)
    if backend is not None:
        raise DataError(f"{path}: --backend picks a model of a run folder; this is a model file already")
    run = RunFolder.of_model(path)
    if run is None:
        raise DataError(f"{path}: no run folder beside this model to keep the site profile in ({SITE_PROFILES}/)")
    return run, path


def calibrate_site(model: str | Path, data: str | Path, site: str = DEFAULT_SITE,
                   target: float = DEFAULT_SENSITIVITY, confidence: float = DEFAULT_CONFIDENCE,
                   backend: str | None = None, n_boot: int = N_BOOT, seed: int = 0,
                   progress: bool = False) -> SiteCalibration:
    """Score the site's labelled sample ``data`` with the model the site will run, calibrate,
    and write a new profile of ``site`` in the run folder (earlier ones are kept)."""
    check_site_name(site)
    run, file = calibration_model(model, backend)
    predictor = Predictor.load(file)
    if predictor.decision is None:
        raise DataError(f"{file}: no validated thresholds recorded with this model")
    ds = read_dataset(data, predictor.preprocessing.windows)
    if not ds.has_patients:
        raise DataError(f"{ds.source}: calibration needs patient IDs (patients are the independent units of its "
                        "bounds); this layout has none")
    notes = []
    try:
        used = run.seen_origins()
    except DataError as exc:  # the training data is not at the site: usually so
        used = set()
        notes.append(f"could not check the sample against the model's training patients ({exc})")
    origins = ds.origins
    seen = sum(o in used for o in origins)
    if seen:
        raise DataError(f"{ds.source}: {seen} slice(s) belong to this model's training or validation patients, "
                        "whose scores are optimistic; calibrate on the site's own patients")
    inputs = load_inputs(ds, predictor.preprocessing, progress=progress)
    if not len(inputs.y):
        raise DataError(f"{ds.source}: no readable image")
    shipped = (predictor.decision.slice_threshold, predictor.decision.study_threshold)
    try:
        cal = calibrate(inputs.y, predictor.predict(inputs.x), patient_groups(ds, inputs),
                        predictor.decision.study_aggregate, target, confidence, shipped, n_boot, seed)
    except InsufficientSample as exc:
        raise InsufficientSample(f"{ds.source}: {exc}", exc.needed, exc.have) from None
    if inputs.errors:
        notes.append(f"{len(inputs.errors)} unreadable image(s) left out")
    if predictor.decision.context is not None:
        notes.append("the model's slice-context stage is not calibrated here: with this profile slices are "
                     "scored alone")
    cal = replace(cal, notes=[*cal.notes, *notes])
    profile = {
        "site": site, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ichedge_version": __version__,
        "model": {"run": run.path.name, "file": str(file.resolve().relative_to(run.path.resolve())),
                  "runtime": predictor.runtime, "sha256": sha256(file)},
        "target_sensitivity": target, "confidence": confidence, "study_aggregate": cal.study_aggregate,
        "thresholds": {"slice": cal.slice.threshold, "study": cal.study.threshold},
        "slice": {**cal.slice.to_json(), "bound": cal.methods["slice"]},
        "study": {**cal.study.to_json(), "bound": cal.methods["study"]},
        "shipped": {"slice": cal.shipped_slice.to_json(), "study": cal.shipped_study.to_json()},
        "sample": {"data": str(ds.source), **cal.counts},  # counts only: never a patient ID
        "notes": cal.notes,
    }
    return SiteCalibration(cal, profile, run.write_site_profile(site, profile))
