"""The budget-driven search: device budgets, the conditional space, the Pareto front, and a real
Optuna search on a tiny space, stopped and resumed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import optuna
import pytest

import ichedge.tune as tune_module
from ichedge.cli import main
from ichedge.data import read_manifest
from ichedge.devices import MCUS, Architecture, Budget, GraphCost, parse_bytes
from ichedge.evaluation import is_collapsed
from ichedge.model import weights_filename
from ichedge.training import TrainConfig
from ichedge.tune import (Candidate, Evaluator, LocalExecutor, Outcome, Space, TuneResult, _search, _study, beats_paper,
                          best_trial, pareto_front, suggest, tune, weights_for)

KIB = 1024


def test_sizes_parse_binary_and_decimal_units() -> None:
    assert parse_bytes("256KiB") == 262144
    assert parse_bytes("1MiB") == 1048576
    assert parse_bytes("512kB") == 512000
    assert parse_bytes("2048") == 2048
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def cost(arena_kib: float, flash_kib: float, macs: int = 10_000_000) -> GraphCost:
    return GraphCost(int(flash_kib * KIB), int(arena_kib * KIB), macs, 1, 0.1, {"CONV_2D": macs})


def test_budget_names_each_limit_a_graph_passes() -> None:
    budget = Budget(256 * KIB, 512 * KIB, latency_ms=100, mcu=MCUS["cortex-m7"])
    assert budget.over(cost(200, 400, 1_000_000)) == []
    why = budget.over(cost(300, 600, 50_000_000))
    assert [w.split()[0] for w in why] == ["TFLM", "flash", "estimated"]
    # 50 M MACs at 0.57 MAC/cycle and 216 MHz
    assert MCUS["cortex-m7"].latency_ms(50_000_000) == pytest.approx(50e6 / 0.57 / 216e6 * 1e3)


def row(trial: int, auc: float, arena: float, flash: float, collapsed: int = 0, outcome: str = "complete") -> dict:
    return {"trial": trial, "outcome": outcome, "auc_int8": auc, "arena_kib": arena, "flash_kib": flash,
            "collapsed_folds": collapsed}


def test_pareto_front_keeps_only_undominated_trials() -> None:
    rows = [row(0, 0.80, 200, 400), row(1, 0.85, 240, 450), row(2, 0.79, 210, 420), row(3, 0.85, 240, 500)]
    assert pareto_front(rows) == {0, 1}  # 2 is beaten by 0 everywhere; 3 by 1 in flash at equal AUC


def test_best_never_picks_a_collapsed_or_unfinished_trial() -> None:
    rows = [row(0, 0.80, 200, 400), row(1, 0.95, 200, 400, collapsed=2), row(2, 0.99, 200, 400, outcome="pruned")]
    assert best_trial(rows)["trial"] == 0
    assert best_trial(rows, Budget(100 * KIB, 512 * KIB)) is None


def test_a_trial_beats_a_paper_configuration_only_at_equal_or_lower_ram_and_flash() -> None:
    # The paper's 96x96 alpha 0.35 as ichedge measured it: AUC 0.824, 206.0 KiB arena, 635.6 KiB flash.
    beaten = beats_paper([row(7, 0.85, 206.0, 635.6)])
    assert beaten["96x0.35"] == 7
    assert beats_paper([row(7, 0.85, 207.0, 400)])["96x0.35"] is None


def test_collapse_is_a_near_constant_output() -> None:
    assert is_collapsed(np.full(50, 0.37))
    assert is_collapsed(np.r_[np.full(49, 0.5), 0.5 + 1e-5])
    assert not is_collapsed(np.random.default_rng(0).uniform(size=50))


def test_the_space_offers_only_choices_that_apply() -> None:
    space = Space(96, 96, 16, alphas=(0.1, 0.35), heads=("paper", "multilevel"))
    base = TrainConfig()
    # ImageNet weights exist for alpha 0.35 (bundled): frozen or fine-tuned, either head.
    c = suggest(optuna.trial.FixedTrial({"size": 96, "alpha": 0.35, "recipe_pretrained": "fine-tune",
                                         "head": "multilevel", "channels": "gray"}), space, base, None)
    assert (c.recipe, c.config.weights, c.config.fine_tune_epochs, c.config.trim) == ("fine-tune", "imagenet", 5, False)
    # None for alpha 0.1: only from scratch, with the paper head, never a download.
    c = suggest(optuna.trial.FixedTrial({"size": 96, "alpha": 0.1, "recipe_random": "scratch", "head_random": "paper",
                                         "trim": True, "channels": "brain-bone"}), space, base, None)
    assert (c.recipe, c.config.weights, c.config.head, c.config.trim) == ("scratch", "random", "paper", True)
    with pytest.raises(ValueError):
        suggest(optuna.trial.FixedTrial({"size": 96, "alpha": 0.1, "recipe_random": "frozen", "head_random": "paper",
                                         "trim": False, "channels": "gray"}), space, base, None)


def test_weights_come_from_the_bundle_or_a_local_folder_never_a_download(tmp_path: Path) -> None:
    (tmp_path / weights_filename(1.0, 224)).write_bytes(b"")
    assert weights_for(0.35, 96, None) == "imagenet"  # bundled
    assert weights_for(1.0, 96, tmp_path) == str(tmp_path / weights_filename(1.0, 224))
    assert weights_for(0.5, 96, tmp_path) is None and weights_for(1.0, 96, None) is None


def test_a_bad_budget_is_one_clear_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--ram", "lots", "--flash", "1MiB"]) == 2
    assert "'lots' is not a size" in capsys.readouterr().err
    assert main(["tune", "--ram", "256KiB", "--flash", "1MiB", "--sizes", "96-160"]) == 2
    assert "is not LOW:HIGH:STEP" in capsys.readouterr().err


# --- a real search on a tiny space, stopped after its first trial and resumed -------------------

# Two architectures at 32x32: the untrimmed backbone's int8 model (about 636 KiB) is over the
# 512 KiB flash budget, the trimmed one (about 451 KiB) fits.
TINY = Space(32, 32, 16, alphas=(0.35,), heads=("paper",), trims=(False, True), channels=("gray",), recipes=("frozen",))
BUDGET = Budget(200 * KIB, 512 * KIB)


class StopAtSecondJob(LocalExecutor):
    """Ctrl-C as the second trial starts."""

    def __init__(self) -> None:
        self.jobs = 0

    def run(self, evaluate, jobs):
        for job in jobs:
            self.jobs += 1
            if self.jobs == 2:
                raise KeyboardInterrupt
            yield job, evaluate(job.candidate, job.report)


def digest(*arrays: np.ndarray) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


@dataclass
class Folds:
    """The folds a search trains, each with its fit and its model's int8 scores. Installed around the
    search it records them (each is trained for real); installed around a later evaluation of the
    same data it answers a fold trained before from the record, not by training it again, and lists
    every fold asked for (``asked``) whether replayed or trained."""

    trained: list[tuple[tuple, TrainConfig]] = field(default_factory=list)  # (key, configuration), in order
    asked: list[tuple] = field(default_factory=list)
    fits: dict[tuple, object] = field(default_factory=dict)
    scores: dict[tuple, tuple[object, np.ndarray]] = field(default_factory=dict)  # the model kept: its id is the key

    def install(self, patch: pytest.MonkeyPatch) -> None:
        real_fit, real_scores = tune_module.fit, tune_module._int8_scores

        def fit(config: TrainConfig, inputs, split, **kwargs):
            rows = [getattr(split, part) for part in ("train", "val", "test")]
            key = (repr(config), digest(inputs.x, inputs.y), *(tuple(r.tolist()) for r in rows))
            self.asked.append(key)
            if key not in self.fits:
                self.fits[key] = real_fit(config, inputs, split, **kwargs)
                self.trained.append((key, config))
            return self.fits[key]

        def int8_scores(model, train_x: np.ndarray, test_x: np.ndarray, config: TrainConfig, seed: int) -> np.ndarray:
            key = (id(model), digest(train_x, test_x), repr(config), seed)
            if key not in self.scores:
                self.scores[key] = (model, real_scores(model, train_x, test_x, config, seed))
            return self.scores[key][1]

        patch.setattr(tune_module, "fit", fit)
        patch.setattr(tune_module, "_int8_scores", int8_scores)


@dataclass
class Searched:
    stopped: Path
    stopped_db_sha: str
    result: TuneResult
    folds: Folds


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory: pytest.TempPathFactory, synthetic12: Path) -> Searched:
    ds = read_manifest(synthetic12)
    runs = tmp_path_factory.mktemp("tune")
    base = TrainConfig(epochs=2)
    folds = Folds()
    with pytest.MonkeyPatch.context() as patch:
        folds.install(patch)  # records each fold the search trains, for the pruner test to replay
        with pytest.raises(KeyboardInterrupt):
            tune(ds, BUDGET, trials=2, space=TINY, base=base, folds=2, runs_root=runs, executor=StopAtSecondJob())
        (stopped,) = runs.glob("*-incomplete")
        db = sha(stopped / "study.db")
        result = tune(ds, BUDGET, trials=2, space=TINY, base=base, folds=2, runs_root=runs, resume=stopped)
    return Searched(stopped, db, result, folds)


@pytest.mark.integration
def test_the_search_prunes_over_budget_graphs_and_cross_validates_the_rest(tiny_search: Searched) -> None:
    rows = {r["outcome"]: r for r in tiny_search.result.trials}
    over, done = rows["over-budget"], rows["complete"]
    assert over["trim"] is False and "flash" in over["reason"] and over["flash_kib"] > 512
    assert over["folds"] is None  # nothing was trained
    assert done["trim"] is True and done["flash_kib"] <= 512 and done["arena_kib"] <= 200
    assert done["folds"] == 2 and 0 <= done["auc_int8"] <= 1 and done["pareto"]
    assert tiny_search.result.best["trial"] == done["trial"]
    folder = tiny_search.result.folder
    for name in ("trials.csv", "trials.html", "pareto.png", "summary.json", "study.db"):
        assert (folder / name).is_file(), name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["over_budget"] == 1 and summary["complete"] == 1


@pytest.mark.integration
def test_a_stopped_search_resumes_without_touching_the_old_folder(tiny_search: Searched) -> None:
    stopped = tiny_search.stopped
    assert sha(stopped / "study.db") == tiny_search.stopped_db_sha
    rows = tiny_search.result.trials
    # The stopped folder's trial is in the new study; the one stopped while running is listed as
    # interrupted and its configuration was run again.
    (interrupted,) = [r for r in rows if r["outcome"] == "interrupted"]
    assert any(r["trim"] == interrupted["trim"] and r["trial"] > interrupted["trial"]
               and r["outcome"] in ("complete", "over-budget") for r in rows)
    assert {(r["trim"], r["outcome"]) for r in rows if r["outcome"] in ("complete", "over-budget")} == {
        (False, "over-budget"), (True, "complete")}
    old_rows = (stopped / "trials.csv").read_text().splitlines()
    assert len(old_rows) >= 2 and (tiny_search.result.folder / "trials.csv").read_text().startswith(old_rows[0])


@pytest.mark.integration
def test_graph_cost_is_what_the_trained_export_measures(tiny_search: Searched, tiny_export) -> None:
    """Flash and arena from the untrained graph, as the search prunes by them, against the tiny run
    (32x32, alpha 0.35, untrimmed) trained and exported."""
    graph = json.loads((tiny_search.result.folder / "cache" / f"graph-{Architecture(32, 0.35).key}.json").read_text())
    flash = tiny_export.files["int8"].stat().st_size
    assert abs(graph["flash_bytes"] - flash) / flash < 0.005
    from ichedge.tflm import find_arena
    assert graph["arena_bytes"] == find_arena(tiny_export.files["int8"])


@pytest.mark.integration
def test_a_trial_the_pruner_stops_trains_no_further_fold(tiny_search: Searched, synthetic12: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The search's complete configuration evaluated again (same data, folds and seed) by a new
    evaluator whose pruner stops it after its first fold. That fold is the search's own first fold,
    replayed rather than trained again; the second is never asked for."""
    folds = tiny_search.folds
    (first, config), second = folds.trained[0], folds.trained[1][0]
    assert (config.size, config.alpha, config.trim) == (32, 0.35, True) and first != second
    folds.asked.clear()
    folds.install(monkeypatch)
    evaluate = Evaluator(read_manifest(synthetic12), BUDGET, folds=2, cache=tiny_search.result.folder / "cache")
    reports = []
    outcome = evaluate(Candidate(config, "frozen"), lambda fold, value: reports.append((fold, value)) or True)
    assert outcome.state == "pruned" and outcome.attrs["folds"] == 1 and len(reports) == 1
    assert outcome.value == reports[0][1] == outcome.attrs["auc_int8_folds"][0]
    assert folds.asked == [first]  # fold 0 only, and it was the search's (so nothing was trained here)


def test_the_search_runs_each_configuration_once_and_stops_when_the_space_is_spent(tmp_path: Path) -> None:
    """The driver with a stand-in trial function (no training): TPE proposes the two points of the
    space again and again; each is run once, later proposals get its recorded result, uncounted."""
    calls: list[bool] = []

    def evaluate(candidate: Candidate, report) -> Outcome:
        calls.append(candidate.config.trim)
        attrs = {"key": candidate.key, "folds": 1, "arena_kib": 100.0, "flash_kib": 400.0}
        if candidate.config.trim:
            return Outcome("complete", 0.8, attrs)
        report(0, 0.6)
        return Outcome("pruned", 0.6, attrs)

    study = _study(tmp_path, 0, {})
    _search(study, evaluate, LocalExecutor(), TINY, TrainConfig(), None, trials=3)
    assert sorted(calls) == [False, True]  # two configurations, each once: the third trial never comes
    counted = [t for t in study.trials if t.user_attrs["counted"]]
    repeats = [t for t in study.trials if "repeat_of" in t.user_attrs]
    assert len(counted) == 2 and len(study.trials) == len(counted) + len(repeats) == 4 * 3
    assert all(r.intermediate_values == study.trials[r.user_attrs["repeat_of"]].intermediate_values for r in repeats)


def test_two_slots_never_run_one_configuration_twice_at_once(tmp_path: Path) -> None:
    """With two trials asked for at once (two Ray workers), TPE in a one-point space proposes the
    same configuration twice in one batch: it runs once, the other proposal gets its result after."""
    calls: list[str] = []

    def evaluate(candidate: Candidate, report) -> Outcome:
        calls.append(candidate.key)
        return Outcome("complete", 0.8, {"key": candidate.key, "folds": 1, "arena_kib": 100.0, "flash_kib": 400.0})

    class TwoSlots(LocalExecutor):
        slots = 2  # as on two workers; run here one after the other

    study = _study(tmp_path, 0, {})
    _search(study, evaluate, TwoSlots(), replace(TINY, trims=(True,)), TrainConfig(), None, trials=2)
    assert len(calls) == 1
    first, *repeats = study.trials
    assert repeats and all(t.user_attrs["repeat_of"] == first.number and t.value == first.value for t in repeats)
