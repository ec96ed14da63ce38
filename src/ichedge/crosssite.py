"""The cross-site protocol: does a model validated at one hospital keep its promise at another?

Both sites are split once into the same patient folds (stratified by site and label). In each
fold two models are trained on the fold's training patients and thresholded on its validation
patients, exactly as ``ichedge train`` does:

- ``home``: the home site's patients only (the other site is never seen), as a model shipped
  from one hospital;
- ``both``: both sites' patients, as a model trained with data from the second site.

Both are tested on the same held-out patients of each site. Over the folds every patient is
tested once, so the home-only model is scored on *every* patient of the other site. Reported:
AUC, sensitivity and specificity at the *shipped* threshold (each fold's own, chosen on its
validation patients) with patient-bootstrap intervals over the pooled folds, and the threshold
drift: the shipped threshold against the one that would have reached the target sensitivity on
the held-out patients of each site (an oracle, for the record only: it is chosen on test).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichedge.data import DataError, Dataset, Split, check_no_patient_overlap, combine, kfold_splits
from ichedge.evaluation import pooled_intervals, study_arrays, threshold_for_sensitivity
from ichedge.preprocess import load_inputs, patient_groups, slice_order
from ichedge.report import interval
from ichedge.runs import RESULTS, SLICE_PREDICTIONS, new_folder, write_json
from ichedge.training import TrainConfig, check_context_usable, fit, remap_split

log = logging.getLogger(__name__)

PROTOCOLS = ("home", "both")


@dataclass
class Scored:
    """One protocol's test scores at one site, fold by fold."""

    y: list[np.ndarray] = field(default_factory=list)
    p: list[np.ndarray] = field(default_factory=list)
    groups: list[np.ndarray] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)  # the shipped one: chosen on that fold's validation
    study_threshold: list[float] = field(default_factory=list)

    def add(self, y: np.ndarray, p: np.ndarray, groups: np.ndarray, threshold: float, study_threshold: float) -> None:
        for name, value in (("y", y), ("p", p), ("groups", groups), ("threshold", threshold),
                            ("study_threshold", study_threshold)):
            getattr(self, name).append(value)

    def summary(self, target: float, aggregate: str, n_boot: int) -> dict:
        """Pooled figures with patient-bootstrap intervals, and the threshold drift."""
        folds = list(zip(self.y, self.p, self.groups, self.threshold))
        out = {"slices": int(sum(len(y) for y in self.y)), "patients": int(len(set(np.concatenate(self.groups)))),
               "pooled": pooled_intervals(folds, n_boot)}
        oracle = [threshold_for_sensitivity(y, p, target) if y.sum() else np.nan for y, p in zip(self.y, self.p)]
        out["threshold"] = {"shipped": float(np.mean(self.threshold)), "for_target_on_this_site": float(np.nanmean(oracle)),
                            "drift": float(np.nanmean(np.array(oracle) - np.array(self.threshold)))}
        flagged, positive = 0, 0  # studies with a bleed, flagged by the study rule at the shipped study threshold
        for y, p, g, t in zip(self.y, self.p, self.groups, self.study_threshold):
            ys, ss = study_arrays(g, y, p, aggregate)
            flagged += int(((ss >= t) & (ys == 1)).sum())
            positive += int(ys.sum())
        out["study_sensitivity"] = {"value": flagged / positive if positive else float("nan"), "positives": positive}
        return out


@dataclass
class CrossSite:
    """What :func:`cross_site` measured: per protocol and site, the pooled summary."""

    config: TrainConfig
    sites: tuple[str, str]
    folds: int
    summary: dict[str, dict[str, dict]]
    scores: dict[str, dict[str, Scored]]
    notes: list[str]
    sources: list[dict]  # each site's provenance and licence (Dataset.provenance)


def _home_only(split: Split, sources: np.ndarray, home: str) -> Split:
    keep = lambda idx: idx[sources[idx] == home]  # noqa: E731
    return Split(keep(split.train), keep(split.val), split.test)


def cross_site(config: TrainConfig, home: Dataset, other: Dataset, folds: int = 5, seed: int = 0,
               progress: bool = False, n_boot: int = 2000) -> CrossSite:
    """Run the protocol of this module's docstring for ``config`` (frozen-backbone training only:
    features are computed once and every fold's heads train on them)."""
    if home.parts or other.parts:
        raise DataError("the cross-site protocol compares two sites: give one dataset for each")
    if config.fine_tune_epochs:
        raise DataError("the cross-site protocol trains heads on frozen features: fine_tune_epochs must be 0")
    ds = combine([home, other])
    check_context_usable(config, ds)
    sites = (ds.parts[0].tag, ds.parts[1].tag)
    splits = kfold_splits(ds, folds, seed)
    inputs = load_inputs(ds, config.preprocessing, progress=progress)
    groups, order = patient_groups(ds, inputs), slice_order(ds, inputs)
    sources = ds.record_sources[inputs.indices]
    scores = {proto: {site: Scored() for site in sites} for proto in PROTOCOLS}
    key = "test_context" if config.context else "test"
    prefix = "context_" if config.context else ""
    features = None
    for k, split in enumerate(splits):
        check_no_patient_overlap(ds, split)
        local = remap_split(split, inputs.indices)
        for proto, part in (("home", _home_only(local, sources, sites[0])), ("both", local)):
            result = fit(config, inputs, part, features=features, progress=progress, groups=groups, order=order)
            features = result.features
            shipped = result.metrics[f"{prefix}high_sensitivity"]["threshold"]
            study = result.metrics[f"{prefix}study_high_sensitivity"]["threshold"]
            te = part.test
            for site in sites:
                at = sources[te] == site
                scores[proto][site].add(result.labels["test"][at], result.probabilities[key][at], groups[te][at],
                                        shipped, study)
            log.info("fold %d, %s: shipped threshold %.3f", k, proto, shipped)
    summary = {proto: {site: s.summary(config.target_sensitivity, config.study_aggregate, n_boot)
                       for site, s in by_site.items()} for proto, by_site in scores.items()}
    notes = [f"{site}: no normal patients, so its specificity is within bleeding patients and its study-level "
             "figure is sensitivity only" for site, part in zip(sites, ds.parts) if _no_normal_patients(part)]
    return CrossSite(config, sites, folds, summary, scores, notes, ds.provenance())


def _no_normal_patients(ds: Dataset) -> bool:
    bleeding = {r.patient for r in ds.records if r.label}
    return all(r.patient in bleeding for r in ds.records)


def table(result: CrossSite) -> list[dict[str, str]]:
    """One row per protocol and test site."""
    home, other = result.sites
    rows = []
    for proto, by_site in result.summary.items():
        trained = f"{home} only" if proto == "home" else f"{home} + {other}"
        for site, s in by_site.items():
            pooled, t = s["pooled"], s["threshold"]
            rows.append({
                "trained on": trained, "tested on": f"{site} ({s['patients']} patients, {s['slices']} slices)",
                "AUC (95% CI)": interval(pooled["auc"]),
                "sensitivity at shipped threshold": interval(pooled["sensitivity"]),
                "specificity at shipped threshold": interval(pooled["specificity"]),
                "study sensitivity": f"{s['study_sensitivity']['value']:.3f} of {s['study_sensitivity']['positives']}",
                "shipped threshold": f"{t['shipped']:.3f}",
                f"threshold for {result.config.target_sensitivity:g} here": f"{t['for_target_on_this_site']:.3f}",
            })
    return rows


def markdown(result: CrossSite) -> str:
    rows = table(result)
    header = list(rows[0])
    c = result.config
    lines = [f"# Cross-site protocol: {c.name}, {result.folds} patient folds (seed {c.seed})", "",
             "Each fold: a model trained on the home site only, and one on both sites; thresholds chosen on the",
             f"fold's validation patients for sensitivity >= {c.target_sensitivity} (the shipped threshold), "
             "tested on the fold's",
             "held-out patients of each site. 95% CIs: all folds' test patients pooled, resampled by patient.",
             "'threshold for ... here': the threshold that would have met the target on that site's held-out",
             "patients (chosen on test: the drift, not a usable threshold)."
             + (" Scores: the slice-context stage's." if c.context else ""),
             *[f"Note: {n}." for n in result.notes], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_cross_site(runs_root: str | Path, result: CrossSite) -> Path:
    """A new folder: results.md, results.json and every test slice's score per fold and protocol."""
    with new_folder(runs_root, f"crosssite-{result.config.name}") as folder:
        (folder.tmp / f"{RESULTS}.md").write_text(markdown(result))
        write_json(folder.tmp / f"{RESULTS}.json", {
            "config": result.config.to_json(), "folds": result.folds, "sites": list(result.sites),
            "summary": result.summary, "notes": result.notes,
            "sources": result.sources})
        with (folder.tmp / SLICE_PREDICTIONS).open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["protocol", "fold", "site", "patient", "label", "probability", "shipped_threshold"])
            for proto, by_site in result.scores.items():
                for site, s in by_site.items():
                    for k, (y, p, g, t) in enumerate(zip(s.y, s.p, s.groups, s.threshold)):
                        w.writerows([proto, k, site, gi, int(yi), f"{pi:.6f}", f"{t:.6f}"] for yi, pi, gi in zip(y, p, g))
    return folder.path
