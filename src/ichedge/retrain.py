"""The gated retrain: a challenger trained with readers' feedback, compared, promoted only if no worse.

:func:`retrain` trains a challenger with the champion's own configuration on the champion's
training patients plus part of the feedback studies (the rest is held out), validates its
thresholds on the champion's validation patients, then scores both models on the champion's
held-out test patients and on the held-out feedback studies. On each set with bleeds and
normals, the challenger must pass :class:`Gate`: its sensitivity at its operating threshold
does not fall (point difference >= 0, and the paired patient-bootstrap 95% interval of the
difference does not reach below ``-sensitivity_margin``) and its AUC does not drop by more than
``auc_margin``. The comparison is written to a new ``<time>-retrain`` folder and, with a store,
recorded there whatever the decision. Both models are compared as Keras models.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ichedge.data import DataError, Split, combine, read_dataset
from ichedge.evaluation import paired_difference
from ichedge.preprocess import load_inputs
from ichedge.runs import COMPARISON, COMPARISON_REPORT, RunFolder, new_folder, write_json
from ichedge.runtimes import KerasPredictor
from ichedge.store import Store, model_id
from ichedge.training import TrainConfig, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gate:
    """What a challenger must show to replace the champion (docs/feedback.md, "Gated retrain")."""

    sensitivity_margin: float = 0.05  # the fall in sensitivity the paired 95% interval may not reach
    auc_margin: float = 0.02  # the AUC drop tolerated

    def check(self, name: str, d: dict) -> list[str]:
        """Reasons the challenger fails on one comparison set (empty: it passes)."""
        s, a = d["sensitivity"], d["auc"]
        reasons = []
        if not s["difference"] >= 0:
            reasons.append(f"{name}: sensitivity falls {s['a']:.3f} -> {s['b']:.3f}")
        elif not s["low"] >= -self.sensitivity_margin:
            reasons.append(f"{name}: a fall of sensitivity beyond {self.sensitivity_margin} is not ruled out "
                           f"(95% interval of the difference {s['low']:+.3f} to {s['high']:+.3f})")
        if not a["difference"] >= -self.auc_margin:
            reasons.append(f"{name}: AUC drops {a['a']:.3f} -> {a['b']:.3f}, more than {self.auc_margin}")
        return reasons


@dataclass
class Retrained:
    folder: Path  # the comparison folder
    challenger: Path  # the challenger's run folder
    promoted: bool
    reasons: list[str]
    comparison: dict = field(default_factory=dict)


def _champion_config(run: RunFolder) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in run.config.items() if k in known})


def retrain(champion: str | Path, feedback_data: list[str | Path], runs_root: Path, *, store: Store | None = None,
            holdout: float = 0.5, gate: Gate = Gate(), seed: int = 0, n_boot: int = 2000,
            progress: bool = False) -> Retrained:
    """Train a challenger with ``feedback_data`` (manifests from ``ichedge feedback export``), compare, decide."""
    champ = RunFolder.of_model(champion)
    if champ is None:
        raise DataError(f"{champion}: not a run folder, nor a model inside one")
    if not 0 <= holdout < 1:
        raise ValueError("holdout must be a fraction in [0, 1)")
    config = _champion_config(champ)
    info = champ.meta["dataset"]
    base = read_dataset(info["source"], tuple(info["windows"]))
    extra = read_dataset(list(feedback_data), tuple(info["windows"]))
    ds = combine([*(base.parts or [base]), *(extra.parts or [extra])])
    position = {r.key: i for i, r in enumerate(base.records)}  # the combined set begins with the base records
    part = {}
    for name in ("train", "val", "test"):
        keys = champ.meta["split"][name]
        missing = [k for k in keys if k not in position]
        if missing:
            raise DataError(f"{info['source']}: {len(missing)} image(s) of the champion's {name} split are gone, "
                            f"e.g. {missing[0]}")
        part[name] = np.array([position[k] for k in keys], np.int64)
    new = np.arange(len(base.records), len(ds.records))
    patients = np.unique(ds.groups[new])
    n_held = max(1, round(holdout * len(patients))) if holdout else 0
    if len(patients) <= n_held:
        raise DataError(f"feedback from {len(patients)} stud(ies): with {n_held} held out, none is left to learn from")
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(patients)[:n_held].tolist())
    is_held = np.isin(ds.groups[new], list(held))
    learn, check = new[~is_held], new[is_held]
    split = Split(np.concatenate([part["train"], learn]), part["val"], part["test"])
    challenger, _ = train(config, ds, split, runs_root, progress=progress)

    models = {"champion": KerasPredictor.open(champ.path), "challenger": KerasPredictor.open(challenger)}
    sets = {"held-out patients": part["test"], "feedback studies": check}
    comparison = {"champion": str(champ.path), "challenger": str(challenger), "gate": vars(gate).copy(),
                  "feedback": {"studies": int(len(patients)), "learned_from": int(len(patients) - len(held)),
                               "held_out": int(len(held)), "slices_learned": int(len(learn))}, "sets": {}}
    reasons = []
    for name, idx in sets.items():
        if not len(idx):
            comparison["sets"][name] = {"slices": 0, "patients": 0, "bleeds": 0,
                                        "skipped": "no study held out (holdout 0)"}
            continue
        loaded = load_inputs(ds, champ.preprocessing, idx)
        y, groups = loaded.y, ds.groups[loaded.indices]
        entry = {"slices": int(len(y)), "patients": int(len(np.unique(groups))), "bleeds": int(y.sum())}
        if len(np.unique(y)) < 2:
            entry["skipped"] = "needs slices with and without a bleed"
        else:
            p = {k: m.predict(loaded.x) for k, m in models.items()}
            t = {k: m.decision.slice_threshold for k, m in models.items()}
            d = paired_difference(y, p["champion"], p["challenger"], groups, t["champion"], t["challenger"],
                                  n_boot=n_boot, seed=seed)
            entry.update(thresholds=t, **d)
            reasons += gate.check(name, d)
        comparison["sets"][name] = entry
    judged = [s for s in comparison["sets"].values() if "skipped" not in s]
    if not judged:
        reasons.append("no comparison set has slices with and without a bleed")
    promoted = not reasons
    comparison.update(promoted=promoted, reasons=reasons)
    with new_folder(runs_root, "retrain") as folder:
        write_json(folder.tmp / COMPARISON, comparison)
        (folder.tmp / COMPARISON_REPORT).write_text(report(comparison))
    if store is not None:
        store.record_retrain(champion=model_id(champ.model_file), challenger=model_id(RunFolder.open(challenger).model_file),
                             champion_run=str(champ.path), challenger_run=str(challenger), promoted=promoted,
                             reason="; ".join(reasons) or "passed every check", figures=comparison)
    return Retrained(folder.path, challenger, promoted, reasons, comparison)


def report(c: dict) -> str:
    """The comparison as Markdown."""
    g, f = c["gate"], c["feedback"]
    lines = ["# Gated retrain", "",
             f"- champion: `{c['champion']}`", f"- challenger: `{c['challenger']}`",
             f"- feedback: {f['studies']} studies, {f['learned_from']} learned from ({f['slices_learned']} slices), "
             f"{f['held_out']} held out",
             f"- gate: sensitivity does not fall (95% interval of the difference above -{g['sensitivity_margin']}), "
             f"AUC drop at most {g['auc_margin']}", "",
             "| set | slices (patients, bleeds) | AUC champion | AUC challenger | sensitivity champion | "
             "sensitivity challenger | difference [95% interval] |", "|---|---|---|---|---|---|---|"]
    for name, s in c["sets"].items():
        head = f"| {name} | {s['slices']} ({s['patients']}, {s['bleeds']}) |"
        if "skipped" in s:
            lines.append(f"{head} {s['skipped']} | | | | |")
            continue
        a, se = s["auc"], s["sensitivity"]
        lines.append(f"{head} {a['a']:.3f} | {a['b']:.3f} | {se['a']:.3f} | {se['b']:.3f} | "
                     f"{se['difference']:+.3f} [{se['low']:+.3f}, {se['high']:+.3f}] |")
    lines += ["", "**Promoted**: the challenger passes every check." if c["promoted"]
              else "**Not promoted**: " + "; ".join(c["reasons"]) + "."]
    return "\n".join(lines) + "\n"
