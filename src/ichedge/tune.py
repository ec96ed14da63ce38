"""Fit the device: a budget-driven model search, as Edge Impulse's EON Tuner does, in the open.

The user gives a device budget (TFLM arena, flash, optionally a latency on a named MCU); Optuna's
TPE sampler proposes configurations (input size, width, head, trimming, channel mode, recipe).
Each trial is first costed from its untrained graph (:func:`ichedge.devices.graph_cost`, cached
per architecture): one over budget is recorded and pruned before any training. One that fits is
cross-validated on patient folds: trained per fold (frozen backbones reuse cached features),
converted to int8 as ``ichedge export`` converts it and scored by LiteRT, its running mean
reported so that the pruner stops a poor trial after its first folds. The objective is the mean
int8 test AUC over the folds, from LiteRT's default int8 kernels (TFLM's reference arithmetic is
far slower on the host; ``apply`` profiles the chosen model under both).

Trials run behind an :class:`Executor`; :class:`LocalExecutor` runs them one after another in
this process, and a cluster engine can run several at once through the same interface. The study
lives in an SQLite file in the search folder, so a stopped search resumes from it (``resume``).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import optuna
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from ichedge.data import DataError, Dataset, check_no_patient_overlap, kfold_splits, train_val_test_split
from ichedge.devices import Architecture, Budget, GraphCost, graph_cost, kib
from ichedge.evaluation import bootstrap_ci, is_collapsed
from ichedge.export import export_run, to_int8_tflite
from ichedge.heads import HEADS
from ichedge.model import _bundled, weights_filename, KERAS_ROWS
from ichedge.plots import plot_pareto
from ichedge.preprocess import Loaded, Preprocessing, load_inputs, patient_groups, slice_order
from ichedge.profiling import profile_run
from ichedge.runs import EXPORT_MODELS, new_folder, write_json
from ichedge.runtimes import LiteRTPredictor
from ichedge.sweep import PAPER_MEASURED
from ichedge.training import TrainConfig, fit, remap_split, train

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
TRIALS = "trials"  # .csv and .html
SEARCH = "search.json"
PARETO = "pareto.png"
CALIBRATION_IMAGES = 200  # as many as `ichedge export` calibrates on

# Training recipes: what a trial does with a backbone that has ImageNet weights, and with one that
# has none. 'fine-tune' unfreezes the top blocks (5 epochs, as `--fine-tune-epochs 5`).
PRETRAINED_RECIPES = ("frozen", "fine-tune")
RANDOM_RECIPES = ("scratch",)
FINE_TUNE_EPOCHS = 5
MAX_ASKS = 4  # proposals per counted trial before a small space counts as exhausted


@dataclass(frozen=True)
class Space:
    """What the search may choose from. Sizes are sampled as an ordered range (``size_step``)."""

    size_min: int = 64
    size_max: int = 224
    size_step: int = 16
    alphas: tuple[float, ...] = (0.05, 0.1, 0.35, 0.5, 0.75, 1.0)
    heads: tuple[str, ...] = ("paper", "multilevel")
    trims: tuple[bool, ...] = (False, True)
    channels: tuple[str, ...] = ("gray", "brain-bone", "2.5d")
    recipes: tuple[str, ...] = PRETRAINED_RECIPES + RANDOM_RECIPES

    def __post_init__(self) -> None:
        for head in self.heads:
            HEADS.get(head)
        unknown = set(self.recipes) - set(PRETRAINED_RECIPES + RANDOM_RECIPES)
        if unknown or not self.alphas or not self.channels:
            raise ValueError(f"search space needs alphas, channels and known recipes (unknown: {sorted(unknown)})")
        Preprocessing(size=self.size_min)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidate:
    """One point of the space: the training configuration and its recipe's name."""

    config: TrainConfig
    recipe: str

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.config.size, self.config.alpha, self.config.head, self.config.trim)

    @property
    def key(self) -> str:
        return f"{self.config.name}-{self.recipe}"


def weights_for(alpha: float, size: int, weights_dir: Path | None) -> str | None:
    """ImageNet weights available offline for ``alpha``: bundled, or a Keras file in ``weights_dir``.

    The search never downloads: a width without local weights is trained from random weights.
    """
    if _bundled(alpha, size) is not None:
        return "imagenet"
    if weights_dir is not None:
        found = sorted((abs(rows - size), weights_dir / weights_filename(alpha, rows)) for rows in KERAS_ROWS
                       if (weights_dir / weights_filename(alpha, rows)).is_file())
        if found:
            return str(found[0][1])
    return None


def suggest(trial: optuna.Trial, space: Space, base: TrainConfig, weights_dir: Path | None) -> Candidate:
    """Ask ``trial`` for a candidate; choices that cannot apply are never offered (conditional space)."""
    size = trial.suggest_int("size", space.size_min, space.size_max, step=space.size_step)
    alpha = trial.suggest_categorical("alpha", list(space.alphas))
    weights = weights_for(alpha, size, weights_dir)
    recipes = [r for r in space.recipes if r in (PRETRAINED_RECIPES if weights else RANDOM_RECIPES)]
    if not recipes:
        raise optuna.TrialPruned(f"alpha {alpha:g}: no recipe in the space for {'ImageNet' if weights else 'random'} "
                                 "weights")
    recipe = trial.suggest_categorical("recipe_pretrained" if weights else "recipe_random", recipes)
    # The multilevel head is fitted on frozen features; from random weights only the paper's trains.
    heads = [h for h in space.heads if weights or h == "paper"] or ["paper"]
    head = trial.suggest_categorical("head" if weights else "head_random", heads)
    trim = trial.suggest_categorical("trim", list(space.trims)) if HEADS.get(head).fits_trimmed else False
    channels = trial.suggest_categorical("channels", list(space.channels))
    return candidate(base, size, alpha, head, trim, channels, recipe, weights)


def candidate(base: TrainConfig, size: int, alpha: float, head: str, trim: bool, channels: str, recipe: str,
              weights: str | None) -> Candidate:
    """``base`` with one point of the space; ``weights``: :func:`weights_for`'s answer (None: random)."""
    config = replace(base, size=size, alpha=alpha, head=head, trim=trim, channels=channels,
                     weights=weights or "random", context=False,
                     fine_tune_epochs=FINE_TUNE_EPOCHS if recipe == "fine-tune" else 0)
    return Candidate(config, recipe)


# --- one trial ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a trial measured. ``state``: 'complete', 'over-budget' or 'pruned' (after ``folds`` folds)."""

    state: str
    value: float | None = None
    attrs: dict = field(default_factory=dict)


Report = Callable[[int, float], bool]  # (fold, running value) -> whether to stop the trial now


class Evaluator:
    """Runs trials on one dataset and fold assignment, with caches shared by its trials: decoded
    inputs per preprocessing, frozen features per backbone, graph costs per architecture (also on
    disk in ``cache``, so a resumed search does not measure them again)."""

    def __init__(self, dataset: Dataset, budget: Budget, folds: int = 5, seed: int = 0, cache: Path | None = None,
                 progress: bool = False) -> None:
        self.dataset, self.budget, self.seed, self.progress = dataset, budget, seed, progress
        self.splits = kfold_splits(dataset, folds, seed)
        for split in self.splits:
            check_no_patient_overlap(dataset, split)
        self.cache = cache
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
        self._inputs: dict[Preprocessing, Loaded] = {}
        self._features: dict[tuple, np.ndarray] = {}
        self._costs: dict[str, GraphCost] = {}

    def cost(self, arch: Architecture) -> GraphCost:
        if arch.key not in self._costs:
            path = self.cache / f"graph-{arch.key}.json" if self.cache else None
            if path is not None and path.is_file():
                self._costs[arch.key] = GraphCost(**json.loads(path.read_text()))
            else:
                self._costs[arch.key] = graph_cost(arch)
                if path is not None:
                    write_json(path, self._costs[arch.key].to_json())
        return self._costs[arch.key]

    def inputs(self, pre: Preprocessing) -> Loaded:
        if pre not in self._inputs:
            self._inputs = {pre: load_inputs(self.dataset, pre, progress=self.progress)}  # one size held at a time
        return self._inputs[pre]

    def __call__(self, candidate: Candidate, report: Report) -> Outcome:
        started = time.perf_counter()
        config = candidate.config
        cost = self.cost(candidate.architecture)
        attrs = {"key": candidate.key, "recipe": candidate.recipe, **_cost_attrs(cost, self.budget)}
        if over := self.budget.over(cost):
            attrs.update(reason="over budget: " + "; ".join(over), seconds=time.perf_counter() - started)
            return Outcome("over-budget", None, attrs)
        inputs = self.inputs(config.preprocessing)
        groups, order = patient_groups(self.dataset, inputs), slice_order(self.dataset, inputs)
        feature_key = (config.preprocessing, config.alpha, config.head, config.trim, config.weights)
        float_auc, int8_auc, collapsed, pooled = [], [], [], []
        for k, split in enumerate(self.splits):
            local = remap_split(split, inputs.indices)
            result = fit(config, inputs, local, features=self._features.get(feature_key), groups=groups, order=order)
            if result.features is not None and config.fine_tune_epochs == 0:
                self._features[feature_key] = result.features
            float_auc.append(float(result.metrics["default"]["auc"]))
            scores = _int8_scores(result.model, inputs.x[local.train], inputs.x[local.test], config, self.seed)
            collapsed.append(is_collapsed(scores))
            int8_auc.append(float(roc_auc_score(inputs.y[local.test], scores)))
            if groups is not None:
                pooled.append((inputs.y[local.test], scores, groups[local.test]))
            log.info("%s fold %d: AUC %.3f, int8 %.3f", candidate.key, k, float_auc[-1], int8_auc[-1])
            if k + 1 < len(self.splits) and report(k, float(np.mean(int8_auc))):
                attrs.update(_fold_attrs(float_auc, int8_auc, collapsed), reason=f"pruned after {k + 1} fold(s)",
                             seconds=time.perf_counter() - started)
                return Outcome("pruned", float(np.mean(int8_auc)), attrs)
        attrs.update(_fold_attrs(float_auc, int8_auc, collapsed))
        if pooled:  # every fold's test patients pooled, resampled by patient
            y, p, g = (np.concatenate(part) for part in zip(*pooled))
            ci = bootstrap_ci(y, p, g.astype(str), 0.5, seed=self.seed)["auc"]
            attrs.update(pooled_auc_int8=ci["value"], pooled_auc_int8_low=ci["low"], pooled_auc_int8_high=ci["high"])
        attrs["seconds"] = time.perf_counter() - started
        return Outcome("complete", float(np.mean(int8_auc)), attrs)


def _cost_attrs(cost: GraphCost, budget: Budget) -> dict:
    return {"flash_kib": cost.flash_bytes / 1024, "arena_kib": cost.arena_bytes / 1024, "macs": cost.macs,
            "parameters": cost.parameters, "host_int8_ms": cost.host_ms,
            "mcu_ms_estimate": budget.mcu.latency_ms(cost.macs)}


def _fold_attrs(float_auc: list[float], int8_auc: list[float], collapsed: list[bool]) -> dict:
    return {"folds": len(int8_auc), "auc_float": float(np.mean(float_auc)), "auc_int8_folds": int8_auc,
            "auc_int8_sd": float(np.std(int8_auc, ddof=1)) if len(int8_auc) > 1 else 0.0,
            "collapsed_folds": int(sum(collapsed))}


def _int8_scores(model, train_x: np.ndarray, test_x: np.ndarray, config: TrainConfig, seed: int) -> np.ndarray:
    """The fold's model converted as `ichedge export` converts it (calibrated on its training images),
    scored on the test fold by LiteRT on one thread."""
    calibration = train_x[np.random.default_rng(seed).permutation(len(train_x))[:CALIBRATION_IMAGES]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / EXPORT_MODELS["int8"]
        path.write_bytes(to_int8_tflite(model, calibration.astype("float32")))
        return LiteRTPredictor(path, config.preprocessing, num_threads=1).predict(test_x)


# --- executors ----------------------------------------------------------------------------------


@dataclass
class Job:
    """A trial to run: its number in the study, the candidate, and where to report fold results."""

    number: int
    candidate: Candidate
    report: Report


class Executor(Protocol):
    """Runs jobs and yields each one's outcome as it finishes. ``slots`` jobs may run at once: the
    search asks for that many candidates before waiting (TPE's constant liar keeps them apart)."""

    slots: int

    def run(self, evaluate: Evaluator, jobs: Sequence[Job]) -> Iterator[tuple[Job, Outcome]]: ...


class LocalExecutor:
    """One trial at a time in this process: the caches of ``evaluate`` serve every trial."""

    slots = 1

    def run(self, evaluate: Evaluator, jobs: Sequence[Job]) -> Iterator[tuple[Job, Outcome]]:
        for job in jobs:
            yield job, evaluate(job.candidate, job.report)


# --- the search ---------------------------------------------------------------------------------


@dataclass
class TuneResult:
    folder: Path
    trials: list[dict]
    best: dict | None
    applied: dict | None = None


def _settings(budget: Budget, space: Space, base: TrainConfig, dataset: Dataset, folds: int, seed: int) -> dict:
    return {"budget": budget.to_json(), "space": space.to_json(), "base": base.to_json(), "data": dataset.summary(),
            "folds": folds, "seed": seed}


def tune(
    dataset: Dataset,
    budget: Budget,
    trials: int = 30,
    space: Space = Space(),
    base: TrainConfig = TrainConfig(),
    folds: int = 5,
    seed: int = 0,
    runs_root: Path = Path("runs"),
    weights_dir: Path | None = None,
    executor: Executor | None = None,
    apply: bool = False,
    resume: Path | None = None,
    progress: bool = False,
) -> TuneResult:
    """Search ``space`` for the best int8 cross-validated AUC within ``budget``; writes a search folder.

    ``resume`` is an earlier search folder (finished or ``-incomplete``): its study continues in the
    new folder until it holds ``trials`` trials; the old folder is left as it was. ``apply`` trains the
    best configuration on one patient split, exports and profiles it, into ``chosen/``.
    """
    executor = executor or LocalExecutor()
    settings = _settings(budget, space, base, dataset, folds, seed)
    name = f"tune-{kib(budget.ram).removesuffix('.0')}KiB-{kib(budget.flash).removesuffix('.0')}KiB"
    with new_folder(runs_root, name, keep_failed=True) as folder:
        tmp = folder.tmp
        if resume is not None:
            _carry_over(Path(resume), tmp, settings)
        write_json(tmp / SEARCH, settings)
        study = _study(tmp, seed, settings)
        evaluate = Evaluator(dataset, budget, folds, seed, cache=tmp / "cache", progress=progress)
        if not study.trials and (anchor := _anchor(space, evaluate, weights_dir)) is not None:
            study.enqueue_trial(anchor, user_attrs={"anchor": True})
        try:
            _search(study, evaluate, executor, space, base, weights_dir, trials, progress)
        finally:  # a stopped search keeps its table beside its study
            rows = trial_rows(study)
            if rows:
                write_tables(tmp, rows, budget)
        best = best_trial(rows)
        applied = None
        if apply and best is not None:
            applied = apply_best(best, dataset, base, tmp / "chosen", seed, weights_dir)
            write_json(tmp / "chosen.json", applied)
    return TuneResult(folder.path, rows, best, applied)


def _carry_over(old: Path, new: Path, settings: dict) -> None:
    if not (old / STUDY_DB).is_file():
        raise DataError(f"{old}: no {STUDY_DB}, so not a search folder to resume")
    saved = json.loads((old / SEARCH).read_text())
    if saved != json.loads(json.dumps(settings)):
        changed = sorted(k for k in settings if saved.get(k) != json.loads(json.dumps(settings[k])))
        raise DataError(f"{old}: was searched with other settings ({', '.join(changed)}); resume with the same ones")
    shutil.copy2(old / STUDY_DB, new / STUDY_DB)
    if (old / "cache").is_dir():
        shutil.copytree(old / "cache", new / "cache")


def _study(folder: Path, seed: int, settings: dict) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # multivariate and group TPE are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=6)
    study = optuna.create_study(
        storage=f"sqlite:///{folder / STUDY_DB}", study_name="ichedge-tune", direction="maximize", sampler=sampler,
        # A trial in the lowest quarter of the finished trials at the same fold stops there, from the second
        # finished trial on (the first is the anchor): one fold's 16 test patients move AUC by several
        # points, so a quarter, not the median; a from-scratch width (about 0.65 against 0.85 frozen)
        # stops after one fold, not five.
        pruner=optuna.pruners.PercentilePruner(25.0, n_startup_trials=1, n_warmup_steps=0, n_min_trials=1),
        load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Interrupted while running: recorded as failed, and its configuration asked for again first.
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return study


def _anchor(space: Space, evaluate: Evaluator, weights_dir: Path | None) -> dict | None:
    """The first trial: the demo's recipe (ImageNet alpha 0.35, frozen, paper head, gray) at the paper's
    smallest input, 96x96, trimmed if need be. Until one trial has finished the pruner cannot judge,
    and an unlucky random start (a from-scratch width, minutes per fold) would run all its folds."""
    size = min(max(96, space.size_min), space.size_max)
    size -= (size - space.size_min) % space.size_step
    if (not {0.35, "frozen", "paper", "gray"} <= {*space.alphas, *space.recipes, *space.heads, *space.channels}
            or weights_for(0.35, size, weights_dir) is None):
        return None
    for trim in (False, True):
        if trim in space.trims and not evaluate.budget.over(evaluate.cost(Architecture(size, 0.35, "paper", trim))):
            return {"size": size, "alpha": 0.35, "recipe_pretrained": "frozen", "head": "paper", "trim": trim,
                    "channels": "gray"}
    return None


def _search(study: optuna.Study, evaluate: Evaluator, executor: Executor, space: Space, base: TrainConfig,
            weights_dir: Path | None, trials: int, progress: bool = False) -> None:
    """Run trials until ``trials`` of them measured something new.

    TPE proposes points again in a small categorical space: a repeat of a finished or pruned
    configuration, or an architecture already found over budget, is told its known result at once
    and not counted. With several slots, a repeat of a configuration running in the same batch
    waits for it and is told its result then.
    After ``MAX_ASKS`` x ``trials`` proposals the space is taken as exhausted.
    """
    known: dict[str, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != optuna.trial.TrialState.RUNNING and "key" in t.user_attrs:
            known.setdefault(t.user_attrs["key"], t)
            if t.user_attrs.get("outcome") == "over-budget":
                known.setdefault(t.user_attrs["architecture"], t)
    asks = 0
    bar = tqdm(total=trials, initial=min(trials, _counted(study)), desc="trials", disable=not progress, leave=False)
    while (left := trials - _counted(study)) > 0 and asks < MAX_ASKS * trials:
        jobs, asked, waiting = [], {}, []
        for _ in range(min(left, executor.slots)):
            trial = study.ask()
            asks += 1
            try:
                candidate = suggest(trial, space, base, weights_dir)
            except optuna.TrialPruned as why:
                _finish(study, trial, Outcome("over-budget", None, {"reason": str(why)}), counted=False)
                continue
            seen = known.get(candidate.key) or known.get(candidate.architecture.key)
            if seen is not None and seen.user_attrs.get("outcome") in ("complete", "over-budget", "pruned"):
                _repeat(study, trial, candidate, seen)
                continue
            if any(job.candidate.key == candidate.key for job in jobs):
                waiting.append((trial, candidate))
                continue
            jobs.append(Job(trial.number, candidate, _reporter(trial)))
            asked[trial.number] = trial
        for job, outcome in executor.run(evaluate, jobs):
            outcome.attrs["architecture"] = job.candidate.architecture.key
            _finish(study, asked[job.number], outcome, counted=True)
            frozen = study.get_trials(deepcopy=False)[job.number]
            known[job.candidate.key] = frozen
            if outcome.state == "over-budget":
                known[job.candidate.architecture.key] = frozen
            log.info("trial %d %s: %s", job.number, job.candidate.key, _line(outcome))
            bar.update(1)
            if outcome.state == "complete":
                bar.set_postfix_str(f"last int8 AUC {outcome.value:.3f}")
        for trial, candidate in waiting:
            _repeat(study, trial, candidate, known[candidate.key])
    bar.close()


def _repeat(study: optuna.Study, trial: optuna.Trial, candidate: Candidate, seen: optuna.trial.FrozenTrial) -> None:
    """Tell a repeated proposal the known result of ``seen`` (not counted as a trial)."""
    for step, value in seen.intermediate_values.items():  # a pruned one ranks as it did
        trial.report(value, step)
    repeat = {**seen.user_attrs, "key": candidate.key, "repeat_of": seen.number, "seconds": 0.0}
    _finish(study, trial, Outcome(seen.user_attrs["outcome"], seen.value, repeat), counted=False)


def _reporter(trial: optuna.Trial) -> Report:
    def report(fold: int, value: float) -> bool:
        trial.report(value, fold)
        return trial.should_prune()
    return report


def _counted(study: optuna.Study) -> int:
    return sum(bool(t.user_attrs.get("counted")) for t in study.get_trials(deepcopy=False))


def _finish(study: optuna.Study, trial: optuna.Trial, outcome: Outcome, counted: bool) -> None:
    for k, v in outcome.attrs.items():
        trial.set_user_attr(k, v)
    trial.set_user_attr("outcome", outcome.state)
    trial.set_user_attr("counted", counted)
    if outcome.state == "complete":
        study.tell(trial, outcome.value)
    else:  # over budget or stopped by the pruner: TPE ranks it below every finished trial
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def _line(outcome: Outcome) -> str:
    a = outcome.attrs
    if outcome.state == "over-budget":
        return a.get("reason", "over budget")
    return (f"int8 AUC {outcome.value:.3f} over {a['folds']} fold(s), {a['arena_kib']:.0f} KiB arena, "
            f"{a['flash_kib']:.0f} KiB flash" + (f" ({a['reason']})" if "reason" in a else ""))


# --- tables, the Pareto front, the chosen model ------------------------------------------------

COLUMNS = ("trial", "outcome", "size", "alpha", "head", "trim", "channels", "recipe", "auc_int8", "auc_int8_sd",
           "pooled_auc_int8", "pooled_auc_int8_low", "pooled_auc_int8_high", "auc_float", "folds", "arena_kib",
           "flash_kib", "macs", "parameters", "host_int8_ms", "mcu_ms_estimate", "pareto", "collapsed_folds", "seconds",
           "reason", "repeat_of")


def trial_rows(study: optuna.Study) -> list[dict]:
    """One row per finished trial, from the study (so a resumed search lists every trial)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.RUNNING:
            continue
        a, p = t.user_attrs, t.params
        value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
        if t.state == optuna.trial.TrialState.FAIL and "outcome" not in a:
            a = {**a, "outcome": "interrupted"}  # stopped while running; asked for again on resume
        if value is None and a.get("auc_int8_folds"):
            value = float(np.mean(a["auc_int8_folds"]))  # pruned after some folds: their mean
        rows.append({
            "trial": t.number, "outcome": "repeat" if "repeat_of" in a else a.get("outcome", t.state.name.lower()),
            "size": p.get("size"),
            "alpha": p.get("alpha"), "head": p.get("head", p.get("head_random")), "trim": p.get("trim", False),
            "channels": p.get("channels"), "recipe": a.get("recipe"), "auc_int8": value,
            **{k: a.get(k) for k in COLUMNS[9:] if k != "pareto"}})
    front = pareto_front([r for r in rows if r["outcome"] == "complete" and not r["collapsed_folds"]])
    for r in rows:
        r["pareto"] = r["trial"] in front
    return rows


def pareto_front(rows: Sequence[dict]) -> set[int]:
    """Trials no other trial beats in int8 AUC at equal or lower arena and flash (and is better in one)."""
    def dominates(a: dict, b: dict) -> bool:
        ge = a["auc_int8"] >= b["auc_int8"] and a["arena_kib"] <= b["arena_kib"] and a["flash_kib"] <= b["flash_kib"]
        gt = a["auc_int8"] > b["auc_int8"] or a["arena_kib"] < b["arena_kib"] or a["flash_kib"] < b["flash_kib"]
        return ge and gt
    return {r["trial"] for r in rows if not any(dominates(o, r) for o in rows if o is not r)}


def best_trial(rows: Sequence[dict], budget: Budget | None = None) -> dict | None:
    """The complete trial with the highest int8 AUC (within ``budget`` when given) that never collapsed."""
    fits = [r for r in rows if r["outcome"] == "complete" and not r["collapsed_folds"] and
            (budget is None or (r["arena_kib"] * 1024 <= budget.ram and r["flash_kib"] * 1024 <= budget.flash))]
    return max(fits, key=lambda r: r["auc_int8"], default=None)


def beats_paper(rows: Sequence[dict]) -> dict[str, int | None]:
    """For each of the paper's configurations (as ichedge measured them), a complete trial with higher
    int8 AUC at equal or lower arena and flash, or None."""
    complete = [r for r in rows if r["outcome"] == "complete" and not r["collapsed_folds"]]
    out = {}
    for (size, alpha), m in PAPER_MEASURED.items():
        better = [r for r in complete if r["auc_int8"] > m["auc"] and r["arena_kib"] <= m["arena_kib"]
                  and r["flash_kib"] <= m["flash_kib"]]
        out[f"{size}x{alpha:g}"] = max(better, key=lambda r: r["auc_int8"])["trial"] if better else None
    return out


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 100000:
        return f"{v:,}"
    return str(v)


def write_tables(out: Path, rows: list[dict], budget: Budget) -> None:
    """trials.csv, trials.html, pareto.png and summary.json of a search."""
    with (out / f"{TRIALS}.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows([{k: _cell(r.get(k)) if isinstance(r.get(k), float) else r.get(k) for k in COLUMNS} for r in rows])
    best = best_trial(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join(
        f"<tr class='{r['outcome']}{' pareto' if r['pareto'] else ''}{' best' if best and r['trial'] == best['trial'] else ''}'>"
        + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in COLUMNS) + "</tr>" for r in rows)
    budget_text = (f"TFLM arena &le; {kib(budget.ram)} KiB, flash &le; {kib(budget.flash)} KiB"
                   + (f", estimated latency &le; {budget.latency_ms:g} ms on {budget.mcu.name}" if budget.latency_ms else ""))
    (out / f"{TRIALS}.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>ichedge tune</title><style>"
        "body{font:14px sans-serif} table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:2px 6px}"
        " tr.over-budget{color:#999} tr.pruned{color:#666} tr.pareto{background:#eef6ff} tr.best{font-weight:bold}"
        "</style>"
        f"<h1>Model search</h1><p>Budget: {budget_text}. AUC: mean int8 test AUC over patient folds (LiteRT "
        f"default kernels). Arena and flash measured on the int8 graph; MCU latency is an estimate "
        f"({html.escape(budget.mcu.source)}). Blue rows: Pareto front; bold: the best.</p>"
        f"<p><img src='{PARETO}' style='max-width:100%'></p>"
        f"<table><tr>{head}</tr>\n{body}</table>\n")
    plot_pareto(rows, budget, PAPER_MEASURED, out / PARETO)
    write_json(out / "summary.json", {"budget": budget.to_json(), "trials": len(rows),
                                      "complete": sum(r["outcome"] == "complete" for r in rows),
                                      "over_budget": sum(r["outcome"] == "over-budget" for r in rows),
                                      "pruned": sum(r["outcome"] == "pruned" for r in rows),
                                      "best": best, "beats_paper": beats_paper(rows)})


def apply_best(best: dict, dataset: Dataset, base: TrainConfig, out: Path, seed: int,
               weights_dir: Path | None) -> dict:
    """Train the best trial's configuration on one patient split, export it and profile it."""
    config = candidate(base, best["size"], best["alpha"], best["head"], bool(best["trim"]), best["channels"],
                       best["recipe"], weights_for(best["alpha"], best["size"], weights_dir)).config
    run, _ = train(config, dataset, train_val_test_split(dataset, seed=seed), runs_root=out, progress=False)
    export = export_run(run)
    profile = profile_run(run, export.folder)
    return {"trial": best["trial"], "run": str(run.relative_to(out.parent)), "profile": profile}


def describe(result: TuneResult) -> str:
    """The search in a few lines for the terminal."""
    rows, best = result.trials, result.best
    counts = {s: sum(r["outcome"] == s for r in rows) for s in ("complete", "pruned", "over-budget", "repeat")}
    lines = [f"{len(rows)} trials: {counts['complete']} complete, {counts['pruned']} pruned after early folds, "
             f"{counts['over-budget']} over budget (pruned from the graph alone), {counts['repeat']} repeated "
             "proposals (known result, not counted)"]
    if best is None:
        lines.append("no trial completed within the budget")
    else:
        lines.append(f"best: trial {best['trial']}, {best['size']}x{best['size']} alpha {best['alpha']:g} "
                     f"{best['head']}{' trimmed' if best['trim'] else ''} {best['channels']} {best['recipe']}: int8 AUC "
                     f"{best['auc_int8']:.3f} ± {best['auc_int8_sd']:.3f} ({best['folds']} folds"
                     + (f"; pooled {best['pooled_auc_int8']:.3f}, 95% CI {best['pooled_auc_int8_low']:.3f}-"
                        f"{best['pooled_auc_int8_high']:.3f}" if best.get("pooled_auc_int8") is not None else "")
                     + "), arena "
                     f"{best['arena_kib']:.1f} KiB, flash {best['flash_kib']:.1f} KiB, {best['macs'] / 1e6:.1f} M MACs, "
                     f"~{best['mcu_ms_estimate']:.0f} ms estimated on the MCU")
    if result.applied:
        lines.append(f"chosen model trained, exported and profiled: {result.applied['run']}")
    return "\n".join(lines)
