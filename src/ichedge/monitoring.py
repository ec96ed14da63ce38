"""What the store says about a model in use, by ISO week: volume, flags, drift, reader agreement.

Drift is the population stability index (PSI) of the week's slice scores against the model's
own validation scores (the export's record for a .tflite, the run's for Keras; stored when the
model is first served): :data:`BINS` bins at the validation quantiles, PSI = sum((a - e) *
ln(a / e)). By the usual convention a PSI under 0.1 is stable and over :data:`DRIFT_WARNING`
(0.2) is a shift to act on; a week with fewer than :data:`MIN_DRIFT_SLICES` slices is too small
to judge, since chance alone moves a small sample's PSI past 0.2. Five bins, not the usual ten:
slices of one patient move together, so a reference of a few validation patients is noisy,
and on the demo run's 16 validation patients two random halves differ by a median PSI of 0.068
with 5 bins against 0.127 with 10 (docs/feedback.md, "Monitoring"). Slices the input check
refuses are counted too: a shift large enough is refused rather than scored, and a week with
more than :data:`REFUSED_WARNING` of its files refused, or more than :data:`OOD_WARNING` of its
slices outside the inputs the model was validated on, is warned about: both see a change of
the inputs that the scores may not show. Sensitivity and specificity are estimated from studies a reader judged (their
latest verdict), with Wilson 95% intervals: they describe the judged studies, which readers
choose, not every study.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import sqlalchemy as sa
from scipy.stats import binomtest

from ichedge.store import Store, as_utc, feedback, predictions, requests, slices

DRIFT_WARNING = 0.2
STABLE = 0.1
MIN_DRIFT_SLICES = 50
REFUSED_WARNING = 0.1
OOD_WARNING = 0.1  # of slices with an input OOD score >= 1; 0.4% of the demo run's test slices
BINS = 5
_FLOOR = 1e-4  # an empty bin counts as this share, so a bin no slice fell in does not make PSI infinite


def psi(expected: Sequence[float], actual: Sequence[float], bins: int = BINS) -> float:
    """Population stability index of ``actual`` against ``expected``, in ``expected``'s quantile bins."""
    e, a = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    if len(e) == 0 or len(a) == 0:
        raise ValueError("PSI needs scores on both sides")
    inner = np.unique(np.quantile(e, np.linspace(0, 1, bins + 1)[1:-1]))
    share_e = np.bincount(np.searchsorted(inner, e, side="right"), minlength=len(inner) + 1) / len(e)
    share_a = np.bincount(np.searchsorted(inner, a, side="right"), minlength=len(inner) + 1) / len(a)
    share_e, share_a = np.maximum(share_e, _FLOOR), np.maximum(share_a, _FLOOR)
    return float(np.sum((share_a - share_e) * np.log(share_a / share_e)))


def week_of(t: datetime) -> str:
    year, week, _ = as_utc(t).isocalendar()
    return f"{year}-W{week:02d}"


def rate(k: int, n: int) -> dict | None:
    """A proportion with its Wilson 95% interval, or None without cases."""
    if n == 0:
        return None
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"value": k / n, "low": float(ci.low), "high": float(ci.high), "n": n}


def monitor(store: Store, model_id: str | None = None) -> dict:
    """Weekly figures of one model (default: the one registered last) and the drift warnings."""
    model = store.model(model_id)
    if model is None:
        raise ValueError(f"{store.safe_url()}: no model recorded" + (f" with id {model_id}" if model_id else ""))
    mid = model["id"]
    with store.engine.connect() as conn:
        reqs = conn.execute(sa.select(requests.c.time, requests.c.n_files).where(requests.c.model == mid)).all()
        studies = conn.execute(sa.select(predictions.c.id, predictions.c.time, predictions.c.flagged)
                               .where(predictions.c.model == mid)).all()
        scored = conn.execute(sa.select(predictions.c.time, slices.c.probability, slices.c.flagged, slices.c.outside)
                              .join(predictions, slices.c.prediction_id == predictions.c.id)
                              .where(predictions.c.model == mid)).all()
        judged = conn.execute(sa.select(feedback.c.prediction_id, feedback.c.verdict, feedback.c.hemorrhage)
                              .join(predictions, feedback.c.prediction_id == predictions.c.id)
                              .where(predictions.c.model == mid, feedback.c.slice_hash.is_(None))
                              .order_by(feedback.c.id)).all()
    weeks: dict[str, dict] = defaultdict(lambda: {"requests": 0, "files": 0, "studies": 0, "flagged_studies": 0,
                                                  "scores": [], "flagged_slices": 0, "outside": 0})
    for t, n_files in reqs:
        weeks[week_of(t)]["requests"] += 1
        weeks[week_of(t)]["files"] += n_files or 0
    when = {}
    for pid, t, flagged in studies:
        w = weeks[week_of(t)]
        w["studies"] += 1
        w["flagged_studies"] += flagged
        when[pid] = (week_of(t), flagged)
    for t, p, flagged, outside in scored:
        w = weeks[week_of(t)]
        w["scores"].append(p)
        w["flagged_slices"] += flagged
        w["outside"] += outside
    latest = {pid: (verdict, truth) for pid, verdict, truth in judged}  # ordered by id: the last verdict wins
    verdicts: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)
    for pid, (verdict, truth) in latest.items():
        week, flagged = when[pid]
        verdicts[week].append((verdict == "confirm", truth, flagged))
    reference = model["reference"]
    rows, warnings = [], []
    for week in sorted(weeks):
        w, judged_here = weeks[week], verdicts.get(week, [])
        n = len(w["scores"])
        value = psi(reference, w["scores"]) if reference and n else None
        drift = value is not None and n >= MIN_DRIFT_SLICES and value > DRIFT_WARNING
        if drift:
            warnings.append(f"{week}: slice scores drifted from validation (PSI {value:.2f} > {DRIFT_WARNING}, "
                            f"{n} slices): check the scanners, protocols and input quality before trusting flags")
        elif value is not None and value > DRIFT_WARNING:
            warnings.append(f"{week}: PSI {value:.2f} over {n} slices, too few to judge drift "
                            f"(at least {MIN_DRIFT_SLICES})")
        refused = max(w["files"] - n, 0)
        if w["files"] >= MIN_DRIFT_SLICES and refused / w["files"] > REFUSED_WARNING:
            warnings.append(f"{week}: the input check refused {refused} of {w['files']} files: an acquisition or "
                            "export change? (their reasons are in the responses and `ichedge predict` output)")
        if n >= MIN_DRIFT_SLICES and w["outside"] / n > OOD_WARNING:
            warnings.append(f"{week}: {w['outside']} of {n} slices ({w['outside'] / n:.0%}) are outside the inputs the "
                            "model was validated on: an acquisition change? Read those studies yourself")
        positives = [flagged for _, truth, flagged in judged_here if truth]
        negatives = [not flagged for _, truth, flagged in judged_here if not truth]
        rows.append({"week": week, "requests": w["requests"], "studies": w["studies"], "slices": n,
                     "refused_rate": refused / w["files"] if w["files"] else None,
                     "flag_rate_slices": w["flagged_slices"] / n if n else None,
                     "flag_rate_studies": w["flagged_studies"] / w["studies"] if w["studies"] else None,
                     "psi": value, "ood_rate": w["outside"] / n if n else None, "feedback": len(judged_here),
                     "agreement": (sum(a for a, _, _ in judged_here) / len(judged_here)) if judged_here else None,
                     "sensitivity": rate(sum(positives), len(positives)),
                     "specificity": rate(sum(negatives), len(negatives)), "drift": drift})
    if not reference:
        warnings.append(f"model {mid}: no validation scores recorded, so drift cannot be measured")
    return {"model": {"id": mid, "name": model["name"], "kind": model["kind"]}, "drift_threshold": DRIFT_WARNING,
            "stable_below": STABLE, "min_drift_slices": MIN_DRIFT_SLICES, "bins": BINS, "weeks": rows, "warnings": warnings,
            "models": store.models()}


def format_monitor(report: dict) -> list[str]:
    """The weekly table as text lines (``ichedge monitor``)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    def ci(r: dict | None) -> str:
        return "-" if r is None else f"{r['value']:.2f} [{r['low']:.2f}-{r['high']:.2f}] n={r['n']}"

    m = report["model"]
    lines = [f"model {m['id']} ({m['name']}, {m['kind']}); drift warning at PSI > {report['drift_threshold']}",
             f"{'week':<9} {'requests':>8} {'studies':>7} {'slices':>7} {'refused':>7} {'flag sl':>7} {'flag st':>7} "
             f"{'PSI':>6} {'OOD':>6} {'fb':>4} {'agree':>6}  sensitivity / specificity"]
    for r in report["weeks"]:
        value = "-" if r["psi"] is None else f"{r['psi']:.3f}"
        lines.append(f"{r['week']:<9} {r['requests']:>8} {r['studies']:>7} {r['slices']:>7} "
                     f"{pct(r['refused_rate']):>7} {pct(r['flag_rate_slices']):>7} {pct(r['flag_rate_studies']):>7} {value:>6} "
                     f"{pct(r['ood_rate']):>6} {r['feedback']:>4} {pct(r['agreement']):>6}  "
                     f"{ci(r['sensitivity'])} / {ci(r['specificity'])}" + ("  DRIFT" if r["drift"] else ""))
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return lines
