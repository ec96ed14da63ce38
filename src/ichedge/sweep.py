"""The paper's experiment: a grid of (rho, alpha) configurations, one split or k folds.

Writes a sweep folder holding a run folder per configuration (and fold) and a results table in
the paper's format (Markdown and CSV), with the paper's reported figures beside ours and the
weights each configuration started from.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ichedge.data import Dataset, check_no_patient_overlap, kfold_splits, train_val_test_split
from ichedge.evaluation import pooled_intervals, summarise_folds
from ichedge.export import export_run
from ichedge.heads import HEADS
from ichedge.preprocess import load_inputs, patient_groups, slice_order
from ichedge.profiling import profile_run
from ichedge.report import interval, write_sweep_report
from ichedge.runs import RESULTS, new_folder, write_json
from ichedge.training import TrainConfig, check_context_usable, fit, remap_split, write_run

log = logging.getLogger(__name__)

# Li, "Investigation related to detection of Intracranial Hemorrhage based on edge impulse
# enhanced CT scanning", Tables 1-5 (Kaggle AMINE dataset, no patient IDs): rates in percent.
PAPER_RESULTS: dict[tuple[int, float], dict[str, float]] = {
    (96, 0.35): {"loss": 0.31, "accuracy": 92.1, "fp_rate": 9.0, "tp_rate": 93.5, "fn_rate": 6.5, "tn_rate": 91.0},
    (160, 0.35): {"loss": 0.21, "accuracy": 94.0, "fp_rate": 10.1, "tp_rate": 100.0, "fn_rate": 0.0, "tn_rate": 89.9},
    (96, 0.1): {"loss": 0.11, "accuracy": 96.6, "fp_rate": 3.5, "tp_rate": 96.8, "fn_rate": 3.2, "tn_rate": 96.5},
    (96, 0.05): {"loss": 0.09, "accuracy": 96.8, "fp_rate": 3.0, "tp_rate": 96.5, "fn_rate": 3.5, "tn_rate": 97.0},
    (160, 0.5): {"loss": 0.01, "accuracy": 99.8, "fp_rate": 0.3, "tp_rate": 100.0, "fn_rate": 0.0, "tn_rate": 99.7},
}
# The paper's five configurations as ichedge measures them on CT-ICH (`make cv` and `make sweep
# PROFILE=1`, docs/results.md): slice AUC, mean of the 5 patient folds of seed 0 (float Keras
# model), and the int8 flash and TFLM arena of the exported model, in KiB. 0.1 and 0.05 have no
# ImageNet weights here and train from random weights; so does 0.5 (no weights on this machine).
PAPER_MEASURED: dict[tuple[int, float], dict[str, float]] = {
    (96, 0.35): {"auc": 0.824, "flash_kib": 635.6, "arena_kib": 206.0},
    (160, 0.35): {"auc": 0.864, "flash_kib": 636.3, "arena_kib": 446.0},
    (96, 0.1): {"auc": 0.698, "flash_kib": 245.8, "arena_kib": 180.0},
    (96, 0.05): {"auc": 0.559, "flash_kib": 191.3, "arena_kib": 175.0},
    (160, 0.5): {"auc": 0.703, "flash_kib": 977.0, "arena_kib": 489.0},
}
PAPER_GRID: tuple[tuple[int, float], ...] = tuple(PAPER_RESULTS)
RATE_COLUMNS = ("accuracy", "fp_rate", "tp_rate", "fn_rate", "tn_rate")
RATE_NAMES = {"accuracy": "accuracy", "fp_rate": "FP", "tp_rate": "TP", "fn_rate": "FN", "tn_rate": "TN"}


def parse_grid(text: str) -> list[tuple[int, float]]:
    """``"96x0.35,160x0.5"`` -> [(96, 0.35), (160, 0.5)]."""
    grid: list[tuple[int, float]] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            size, alpha = item.lower().split("x")
            entry = (int(size), float(alpha))
        except ValueError:
            raise ValueError(f"grid item {item!r} is not SIZExALPHA, e.g. 96x0.35") from None
        if entry in grid:
            raise ValueError(f"grid item {item!r} is listed twice")
        grid.append(entry)
    if not grid:
        raise ValueError("empty grid")
    return grid


@dataclass
class ConfigResult:
    config: TrainConfig
    weights: str
    training: str
    folds: list[dict]
    runs: list[str]
    seconds: float
    phase_seconds: list[dict[str, float]]
    profile: dict | None = None
    pooled: dict | None = None  # bootstrap intervals over all folds' test patients
    pooled_context: dict | None = None  # the same for the slice-context scores

    @property
    def summary(self) -> dict:
        return summarise_folds(self.folds)

    @property
    def source_summary(self) -> dict[str, dict]:
        """:attr:`summary` of each source's test slices, where the data has several sources."""
        names = dict.fromkeys(name for f in self.folds for name in f.get("by_source", {}))
        return {name: summarise_folds([f["by_source"][name] for f in self.folds if name in f.get("by_source", {})])
                for name in names}


def run_sweep(
    base: TrainConfig,
    dataset: Dataset,
    grid: Sequence[tuple[int, float]] = PAPER_GRID,
    folds: int = 1,
    seed: int = 0,
    runs_root: Path = Path("runs"),
    progress: bool = True,
    profile: bool = False,
) -> tuple[Path, list[ConfigResult]]:
    """Train every (size, alpha) of ``grid`` on the same patient-level split(s).

    ``folds == 1`` uses one train/validation/test split; ``folds > 1`` patient-grouped k-fold
    cross-validation, every fold's test patients unseen in its training. ``profile`` exports
    and profiles each configuration's first run (flash, TFLM arena, latency, int8 accuracy).
    """
    splits = [train_val_test_split(dataset, seed=seed)] if folds == 1 else kfold_splits(dataset, folds, seed)
    for split in splits:
        check_no_patient_overlap(dataset, split)
    check_context_usable(base, dataset)
    results: list[ConfigResult] = []
    with new_folder(runs_root, f"sweep-{folds}fold" if folds > 1 else "sweep", keep_failed=True) as folder:
        tmp = folder.tmp
        try:
            _run_grid(base, dataset, grid, splits, folds, tmp, progress, profile, results)
        finally:  # an interrupted sweep keeps the tables of the configurations it finished
            if results:
                write_tables(tmp, results, dataset, folds)
    return folder.path, results


def _run_grid(base: TrainConfig, dataset: Dataset, grid: Sequence[tuple[int, float]], splits: list, folds: int,
              tmp: Path, progress: bool, profile: bool, results: list[ConfigResult]) -> None:
    """Train and evaluate each configuration on every split, appending to ``results`` as each finishes."""
    loaded: dict = {}
    for size, alpha in grid:
        config = replace(base, size=size, alpha=alpha)
        pre = config.preprocessing
        if pre not in loaded:  # images are decoded once per input size and channel mode
            loaded = {pre: load_inputs(dataset, pre, progress=progress)}
        inputs = loaded[pre]
        started = time.perf_counter()
        features, fold_metrics, runs, phases, measured, pooled, pooled_context = None, [], [], [], None, [], []
        groups, order = patient_groups(dataset, inputs), slice_order(dataset, inputs)
        sources = dataset.record_sources[inputs.indices]
        for k, split in enumerate(splits):
            local = remap_split(split, inputs.indices)
            result = fit(config, inputs, local, features=features, progress=progress, groups=groups, order=order,
                         sources=sources)
            if groups is not None:
                pooled.append((result.labels["test"], result.probabilities["test"], groups[local.test],
                               result.metrics["high_sensitivity"]["threshold"]))
            if "test_context" in result.probabilities:
                pooled_context.append((result.labels["test"], result.probabilities["test_context"],
                                       groups[local.test], result.metrics["context_high_sensitivity"]["threshold"]))
            features = result.features  # the frozen backbone's: the same for every fold
            name = f"{config.name}" + (f"-fold{k}" if folds > 1 else "")
            write_run(tmp / name, config, dataset, inputs, local, result)
            if profile and k == 0:
                profiling_started = time.perf_counter()
                measured = _export_and_profile(tmp / name)
                started += time.perf_counter() - profiling_started  # "train s" stays training time
            runs.append(name)
            fold_metrics.append(result.metrics)
            phases.append(result.seconds)
            log.info("%s: test AUC %.3f", name, result.metrics["default"]["auc"])
        results.append(
            ConfigResult(
                config, _weights_label(result.weights), _training_label(config, result.weights.pretrained),
                fold_metrics, runs, time.perf_counter() - started, phases, measured,
                pooled_intervals(pooled) if folds > 1 and pooled else None,
                pooled_intervals(pooled_context) if folds > 1 and pooled_context else None,
            )
        )


def _weights_label(weights) -> str:
    return {"bundled": "ImageNet (bundled)", "file": "file", "keras-download": "ImageNet (download)"}.get(
        weights.source, "RANDOM (no ImageNet weights here)"
    )


def _training_label(config: TrainConfig, pretrained: bool) -> str:
    if not pretrained:
        return f"from scratch, {config.epochs} ep"
    text = HEADS.get(config.head).frozen_training(config.epochs)
    return text + (f" + fine-tune {config.fine_tune_epochs} ep" if config.fine_tune_epochs else "")


def _fmt(stat: dict[str, float], percent: bool, folds: int) -> str:
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    text = f"{stat['mean'] * scale:.{digits}f}"
    if folds > 1:
        text += f" ± {stat['sd'] * scale:.{digits}f}"
        if stat["n"] < folds:  # some folds left it undefined (e.g. PPV with nothing flagged)
            text += f" (n={stat['n']})"
    return text


def table_rows(results: Sequence[ConfigResult], folds: int) -> list[dict[str, str]]:
    rows = []
    for r in results:
        s = r.summary
        d, hs = s["default"], s["high_sensitivity"]
        paper = PAPER_RESULTS.get((r.config.size, r.config.alpha), {})
        row = {"rho": f"{r.config.size}x{r.config.size}", "alpha": f"{r.config.alpha:g}", "weights": r.weights,
               "training": r.training}
        row["paper loss"] = f"{paper['loss']:.2f}" if paper else "-"
        for c in RATE_COLUMNS:
            row[f"paper {RATE_NAMES[c]}"] = f"{paper[c]:.1f}%" if paper else "-"
        row["loss"] = _fmt(d["loss"], False, folds)
        for c in RATE_COLUMNS:
            row[RATE_NAMES[c]] = _fmt(d[c], True, folds) + "%"
        row["AUC"] = _fmt(d["auc"], False, folds)
        row["hs threshold"] = _fmt(hs["threshold"], False, folds)
        row["hs sensitivity"] = _fmt(hs["sensitivity"], True, folds) + "%"
        row["hs specificity"] = _fmt(hs["specificity"], True, folds) + "%"
        if "study_high_sensitivity" in s:
            st = s["study_high_sensitivity"]
            row["study AUC"] = _fmt(st["auc"], False, folds)
            row["study sensitivity"] = _fmt(st["sensitivity"], True, folds) + "%"
            row["study specificity"] = _fmt(st["specificity"], True, folds) + "%"
        if r.pooled:
            row.update(_pooled_columns(r.pooled, ""))
        if "context_default" in s:
            c, chs, cst = s["context_default"], s["context_high_sensitivity"], s["context_study_high_sensitivity"]
            row["context AUC"] = _fmt(c["auc"], False, folds)
            row["context hs sensitivity"] = _fmt(chs["sensitivity"], True, folds) + "%"
            row["context hs specificity"] = _fmt(chs["specificity"], True, folds) + "%"
            row["context study AUC"] = _fmt(cst["auc"], False, folds)
        if r.pooled_context:
            row.update(_pooled_columns(r.pooled_context, "context "))
        for source, ss in r.source_summary.items():
            row[f"{source} AUC"] = _fmt(ss["default"]["auc"], False, folds)
            row[f"{source} hs sensitivity"] = _fmt(ss["high_sensitivity"]["sensitivity"], True, folds) + "%"
            row[f"{source} hs specificity"] = _fmt(ss["high_sensitivity"]["specificity"], True, folds) + "%"
        row["train s"] = f"{r.seconds:.0f}"
        if r.profile:
            row.update(profile_columns(r.profile))
        rows.append(row)
    return rows


def _pooled_columns(pooled: dict, prefix: str) -> dict[str, str]:
    row = {f"{prefix}pooled AUC (95% CI)": interval(pooled["auc"])}
    for m in ("sensitivity", "specificity"):
        ci = pooled[m]
        row[f"{prefix}hs {m} 95% CI"] = f"{100 * ci['low']:.1f}-{100 * ci['high']:.1f}%"
    return row


def _export_and_profile(run: Path) -> dict:
    return profile_run(run, export_run(run).folder)


def profile_columns(p: dict) -> dict[str, str]:
    acc = p["accuracy"]
    return {
        "params": f"{p['parameters']:,}",
        "MMACs": f"{p['macs'] / 1e6:.1f}",
        "flash KiB (int8)": f"{p['flash_bytes'] / 1024:.1f}",
        "RAM KiB (TFLM arena)": f"{p['tflm_arena_bytes'] / 1024:.1f}",
        "int8 ms": f"{p['latency_ms']['int8']['median']:.2f}",
        "float32 ms": f"{p['latency_ms']['float32']['median']:.2f}",
        "AUC float32": f"{acc['float32']['auc']:.3f}",
        "AUC int8": f"{acc['int8']['auc']:.3f}",
        "AUC int8 (TFLM kernels)": f"{acc['int8_reference']['auc']:.3f}",
    }


def write_tables(out: Path, results: Sequence[ConfigResult], dataset: Dataset, folds: int) -> None:
    rows = table_rows(results, folds)
    # Rows may differ in columns (a random-weights row has no context figures): every column
    # any row has, in first-seen order, and "-" where a row has none.
    header = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{h: r.get(h, "-") for h in header} for r in rows]
    with (out / f"{RESULTS}.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    unit = dataset.split_unit
    split = f"{folds} folds grouped by {unit} (mean ± sd)" if folds > 1 else f"one split by {unit}"
    notes = [
        f"Evaluation: {split}. Our loss, accuracy and TP/FP/FN/TN rates (within each true class) are",
        "on the test slices at threshold 0.5, as the paper reports them; 'hs' columns are at the",
        f"threshold chosen on validation for sensitivity >= {results[0].config.target_sensitivity}.",
        f"'study' columns score each test patient by the {results[0].config.study_aggregate} aggregate of",
        "its slices (positive when any slice is), at a study threshold chosen the same way.",
        "Paper columns: Li's Tables 1-5, measured on a Kaggle set without patient IDs (slice-level",
        "split, so patients leak); they are not comparable to a patient-level split.",
    ]
    if results[0].pooled:
        notes += ["95% CIs: all folds' test patients pooled and resampled by patient (2,000 draws);",
                  "sensitivity and specificity at each fold's own validation-chosen threshold."]
    if results[0].config.context:
        notes += ["'context' columns: each slice re-scored from its own, its neighbours' and its study's slice",
                  "scores and its position (ichedge.context), fitted on out-of-fold scores of the training",
                  "patients; thresholds chosen on validation the same way."]
    lines = [f"# Sweep: {dataset.summary()}", "", *notes, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r[h] for h in header) + " |" for r in rows]
    if dataset.credit:
        lines += ["", f"Data: {dataset.credit}"]
    (out / f"{RESULTS}.md").write_text("\n".join(lines) + "\n")
    write_sweep_report(out, rows, notes, dataset, [r.runs for r in results])
    write_json(out / f"{RESULTS}.json",
        [{"config": r.config.to_json(), "weights": r.weights, "training": r.training, "runs": r.runs,
          "seconds": r.seconds, "phase_seconds": r.phase_seconds, "profile": r.profile, "summary": r.summary,
          "pooled": r.pooled, "pooled_context": r.pooled_context, "folds": r.folds} for r in results])
