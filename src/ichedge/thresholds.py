"""A model's validated operating points: the thresholds it was chosen to run at.

Thresholds are chosen on validation patients at training (and again on each exported
runtime's own outputs at export), never on the data a model is later applied to. A run folder
holds them in ``metrics.json``; an exported model in its card's ``thresholds``.

A site may re-choose the slice and study thresholds on its own labelled sample (``ichedge
calibrate``, :mod:`ichedge.acceptance`): :meth:`Decision.with_site` applies such a profile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ichedge.context import SliceContext
from ichedge.data import DataError
from ichedge.runs import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextDecision:
    """A slice-context model (:mod:`ichedge.context`) and the thresholds validated on its scores."""

    model: SliceContext
    slice_threshold: float
    study_threshold: float

    def to_card(self) -> dict:
        """As a model card's ``thresholds.context`` holds it."""
        return {"model": self.model.to_json(), "high_sensitivity": self.slice_threshold, "study": self.study_threshold}


@dataclass(frozen=True)
class Decision:
    """The thresholds a model was validated with: slices, and studies by an aggregate of slices;
    and, for a run trained with slice context, the context model with its own thresholds."""

    slice_threshold: float
    study_threshold: float
    study_aggregate: str
    target_sensitivity: float
    context: ContextDecision | None = None
    site: str | None = None  # the site profile whose thresholds these are; None: as validated at training

    @staticmethod
    def from_thresholds(t: dict, runtime: str | None = None) -> Decision:
        """From a model card's ``thresholds``: those chosen on this runtime's own validation
        outputs where the card has them (int8 arithmetic moves probabilities), else the Keras
        model's. Cards made before study metrics flag a study when any slice is flagged."""
        own = t.get("by_runtime", {}).get(runtime or "")
        if runtime and own is None:
            log.warning("no thresholds validated on %s outputs in this model card; using the Keras model's", runtime)
        chosen = own or t
        context = None
        if "context" in t:
            if own is not None and "context" not in own:
                log.warning("no slice-context thresholds validated on %s outputs in this model card; "
                            "using the Keras model's", runtime)
            c = chosen.get("context", t["context"])
            context = ContextDecision(SliceContext.from_json(t["context"]["model"]), float(c["high_sensitivity"]),
                                      float(c["study"]))
        decision = Decision(float(chosen["high_sensitivity"]), float(chosen.get("study", chosen["high_sensitivity"])),
                            t.get("study_aggregate", "max"), float(t["high_sensitivity_target"]), context)
        # `ichedge export --site` ships a site's thresholds in the card: they are what the site runs.
        return decision.with_site(t["site"], runtime or "keras") if "site" in t else decision

    @staticmethod
    def of_run(run: RunFolder) -> Decision:
        return Decision.from_thresholds(run_thresholds(run))

    def with_site(self, profile: dict, runtime: str, model_sha256: str | None = None) -> Decision:
        """This decision at a site profile's slice and study thresholds (and the study aggregate
        they were chosen for). A profile was calibrated on one runtime's outputs of one model file:
        another runtime (int8 arithmetic moves probabilities) or another file is warned about.

        The profile covers the network's own slice scores only: the slice-context stage, fitted
        and thresholded on the training hospital's studies, is left off (``context`` None).
        """
        try:
            site, model = profile["site"], profile["model"]
            if model["runtime"] != runtime:
                log.warning("site profile %r was calibrated on %s outputs; this model runs %s, whose probabilities "
                            "differ: recalibrate with this runtime (`ichedge calibrate --backend`)",
                            site, model["runtime"], runtime)
            elif model_sha256 is not None and model["sha256"] != model_sha256:
                log.warning("site profile %r was calibrated on another %s model file (%s); recalibrate on this one",
                            site, runtime, model["file"])
            return replace(self, slice_threshold=float(profile["thresholds"]["slice"]),
                           study_threshold=float(profile["thresholds"]["study"]),
                           study_aggregate=profile["study_aggregate"],
                           target_sensitivity=float(profile["target_sensitivity"]), context=None, site=site)
        except (KeyError, TypeError) as exc:
            raise DataError(f"site profile {profile.get('site', '?')!r}: unusable, no {exc}; recalibrate") from None

    def to_json(self) -> dict:
        out = {"slice_threshold": self.slice_threshold, "study_threshold": self.study_threshold,
               "study_aggregate": self.study_aggregate, "target_sensitivity": self.target_sensitivity}
        if self.site is not None:
            out["site"] = self.site
        if self.context is not None:
            out["context"] = {"slice_threshold": self.context.slice_threshold,
                              "study_threshold": self.context.study_threshold}
        return out


def run_thresholds(run: RunFolder) -> dict:
    """A run folder's validated thresholds, as a model card holds them (context model included)."""
    metrics = run.metrics()
    t = {"high_sensitivity": metrics["high_sensitivity"]["threshold"],
         "high_sensitivity_target": run.config["target_sensitivity"], **study_decision(run.config, metrics)}
    model = run.context_model()
    if model is not None:
        try:
            t["context"] = ContextDecision(model, metrics["context_high_sensitivity"]["threshold"],
                                           metrics["context_study_high_sensitivity"]["threshold"]).to_card()
        except KeyError as exc:
            raise DataError(f"{run.path}: the slice-context stage has no validated thresholds ({exc})") from None
    return t


def study_decision(config: dict, metrics: dict) -> dict:
    """How slices add up to a study decision. Runs from before study metrics flag a study when
    any slice is flagged (maximum at the slice threshold)."""
    if "study_high_sensitivity" in metrics:
        return {"study_aggregate": config["study_aggregate"], "study": metrics["study_high_sensitivity"]["threshold"]}
    return {"study_aggregate": "max", "study": metrics["high_sensitivity"]["threshold"]}
