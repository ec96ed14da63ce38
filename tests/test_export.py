"""Export, LiteRT prediction, TFLM agreement and the arena search, on a tiny trained run."""

import json
import logging
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

import ichedge.export as export
import ichedge.runtimes as runtimes
import ichedge.tflm as tflm
from ichedge.cli import main
from ichedge.data import DataError
from ichedge.evaluation import threshold_for_sensitivity
from ichedge.export import c_array, calibration_sample, export_run
from ichedge.heads import MULTILEVEL_TAPS, pool_name, tap_int8_steps
from ichedge.intake import Prepared
from ichedge.model import sha256
from ichedge.profiling import count_macs, profile_run
from ichedge.runs import RunFolder
from ichedge.runtimes import Predictor
from ichedge.studies import study_arrays
from ichedge.tflm import TFLMCrash, TFLMError, _unsupported_op, find_arena, run_tflm
from ichedge.triage import triage


@pytest.fixture(scope="module")
def exported(tiny_export):
    """The shared tiny run (32x32, alpha 0.35, slice context) exported: small enough in seconds."""
    return tiny_export


def test_c_array_is_aligned_and_exact():
    header, source = c_array(bytes([0, 1, 254, 255]), "model_int8")
    assert "extern const unsigned char model_int8[];" in header
    assert "alignas(16) const unsigned char model_int8[]" in source
    assert "0x00, 0x01, 0xfe, 0xff" in source and "model_int8_len = 4;" in source


def test_export_writes_every_artefact_and_a_truthful_card(exported):
    folder, card = exported.folder, exported.card
    assert folder.name == "export"
    assert {p.name for p in folder.iterdir()} >= {
        "model_float32.tflite", "model_int8.tflite", "model_int8.h", "model_int8.cc", "model_card.json", "model_card.md"}
    q = card["quantization"]
    assert q["input"]["dtype"] == "int8" and q["output"]["dtype"] == "int8"
    assert q["input"]["shape"] == [1, 32, 32, 3]
    assert card["preprocessing"]["size"] == 32
    for entry in card["files"].values():
        assert sha256(folder / entry["name"]) == entry["sha256"]
    source = (folder / "model_int8.cc").read_text()
    assert f"model_int8_len = {(folder / 'model_int8.tflite').stat().st_size};" in source
    assert "Data credit" in (folder / "model_card.md").read_text()


def test_a_second_export_never_overwrites_the_first(tiny_run, exported, monkeypatch):
    before = (exported.folder / "model_int8.tflite").read_bytes()
    # the conversions are deterministic (the same bytes each time) and cost most of an export:
    # the second one reuses the first's, and everything else runs as it does
    monkeypatch.setattr(export, "to_float_tflite", lambda model: exported.files["float32"].read_bytes())
    monkeypatch.setattr(export, "to_int8_tflite", lambda model, calibration: before)
    again = export_run(tiny_run, calibration_images=20)
    assert again.folder.name == "export-2"
    assert (exported.folder / "model_int8.tflite").read_bytes() == before
    assert again.card["thresholds"] == exported.card["thresholds"] and again.card["files"] == exported.card["files"]


def test_litert_predictors_agree_with_keras(tiny_run, exported):
    x = RunFolder.open(tiny_run).split_part("test")[0].x
    keras_p = Predictor.load(tiny_run).predict(x)
    float_p = Predictor.load(exported.files["float32"]).predict(x)
    int8 = Predictor.load(exported.files["int8"])
    assert int8.kind == "tflite-int8"
    assert np.allclose(float_p, keras_p, atol=1e-4)
    assert np.abs(int8.predict(x) - keras_p).max() < 0.1  # a few int8 steps of 1/256


def test_each_exported_runtime_gets_thresholds_chosen_on_its_own_validation_outputs(tiny_run, exported):
    """int8 arithmetic moves probabilities, so each runtime's thresholds come from its own outputs."""
    run = RunFolder.open(tiny_run)
    meta = run.meta
    val, groups, order = run.split_part("val")
    run_decision = Predictor.load(tiny_run).decision
    assert run_decision.study_aggregate == "top3"
    by_runtime = exported.card["thresholds"]["by_runtime"]
    assert {"float32", "int8-reference"} <= set(by_runtime) and any(k.startswith("int8") and k != "int8-reference"
                                                                    for k in by_runtime)
    for kind, reference in (("float32", False), ("int8", False), ("int8", True)):
        predictor = Predictor.load(exported.files[kind], reference_kernels=reference)
        own = threshold_for_sensitivity(val.y, predictor.predict(val.x), meta["config"]["target_sensitivity"])
        d = predictor.decision
        assert d.slice_threshold == pytest.approx(own) == pytest.approx(by_runtime[predictor.runtime]["high_sensitivity"])
        assert d.study_aggregate == "top3" and d.study_threshold == by_runtime[predictor.runtime]["study"]
        scored = d.context.model.apply(predictor.predict(val.x), groups, order)
        own = threshold_for_sensitivity(val.y, scored, meta["config"]["target_sensitivity"])
        assert d.context.slice_threshold == pytest.approx(own)
        assert d.context.slice_threshold == by_runtime[predictor.runtime]["context"]["high_sensitivity"]
        own_study = threshold_for_sensitivity(*study_arrays(groups, val.y, scored, "top3"),
                                              meta["config"]["target_sensitivity"])
        assert d.context.study_threshold == pytest.approx(own_study) == by_runtime[predictor.runtime]["context"]["study"]
    assert run_decision.context.model == Predictor.load(exported.files["int8"]).decision.context.model
    card_md = (exported.folder / "model_card.md").read_text()
    assert "int8-reference: slice" in card_md and "; slice context: slice" in card_md


def test_triage_applies_slice_context_when_asked_in_slice_order(tiny_run, exported):
    val, groups, order = RunFolder.open(tiny_run).split_part("val")
    shuffle = np.random.default_rng(0).permutation(len(val.y))  # input order must not matter
    prepared = Prepared([f"v{i}.png" for i in shuffle], [str(g) for g in groups[shuffle]],
                        [int(o) for o in order[shuffle]], val.x[shuffle], [])
    predictor = Predictor.load(exported.files["int8"], reference_kernels=True)
    d = predictor.decision
    alone = triage(prepared, predictor)
    ctx = triage(prepared, predictor, context=True)
    assert (alone.scoring, ctx.scoring) == ("slice", "slice context")
    assert (alone.slice_threshold, ctx.slice_threshold) == (d.slice_threshold, d.context.slice_threshold)
    assert ctx.study_threshold == d.context.study_threshold
    network = np.array([s.probability for s in alone.slices])
    assert [s.network_probability for s in ctx.slices] == pytest.approx(network)
    in_order = d.context.model.apply(network[np.argsort(shuffle)], groups, order)  # unshuffled, as validated
    assert [s.probability for s in ctx.slices] == pytest.approx(in_order[shuffle])
    assert [s.flagged for s in ctx.slices] == (in_order[shuffle] >= d.context.slice_threshold).tolist()
    assert all(s.network_probability is None for s in alone.slices) and not alone.notes
    # these synthetic studies have 6 slices: each is named as too short for what context learnt from
    assert len(ctx.notes) == len(set(groups)) and all("6 slice(s)" in n for n in ctx.notes)


def test_tflm_matches_litert_int8_and_finds_the_smallest_arena(exported):
    model = exported.files["int8"]
    arena = find_arena(model)
    assert run_tflm(model, arena).ok
    assert not run_tflm(model, arena - 1024).ok
    int8 = Predictor.load(model)
    x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    reference = Predictor.load(model, reference_kernels=True)
    run = run_tflm(model, arena, int8.quantize(x))
    assert np.abs(run.outputs.reshape(-1).astype(int) - reference.raw(x).astype(int)).max() <= 2


def test_multilevel_head_quantises_as_its_fit_assumes_and_runs_in_tflm(multilevel_run):
    run = multilevel_run.run
    result = export_run(run, calibration_images=20)
    assert "multilevel logistic head" in result.card["model"] and "Dense(8" not in result.card["model"]
    model = result.files["int8"]
    keras_model = Predictor.load(run)
    folder = RunFolder.open(run)
    # the int8 steps fit_logistic floors at are the converted taps' scales (a max keeps its map's)
    steps = tap_int8_steps(keras_model.model, calibration_sample(folder, 20, seed=0))
    scales = {d["name"]: d["quantization"][0] for d in Interpreter(model_path=str(model)).get_tensor_details()}
    for (layer, how), step in zip(MULTILEVEL_TAPS, steps):
        scale = [v for k, v in scales.items() if f"/{pool_name(layer, how)}" in k and k.endswith(("Mean", "Max"))]
        assert scale == [pytest.approx(step, rel=1e-3)], (layer, how)
    assert steps[2] > steps[1], "block_16's max tap is resolved as coarsely as its whole map"
    x = folder.split_part("test")[0].x
    int8 = Predictor.load(model)
    assert np.abs(int8.predict(x) - keras_model.predict(x)).max() < 0.1
    reference = Predictor.load(model, reference_kernels=True)
    result = run_tflm(model, find_arena(model), int8.quantize(x[:4]))  # block_16 is 2x2: a real max pooling
    assert np.abs(result.outputs.reshape(-1).astype(int) - reference.raw(x[:4]).astype(int)).max() <= 2


def test_macs_of_a_known_model(exported):
    # MobileNetV2 alpha 0.35 at 32x32 has ~1/49 of its 224x224 MACs (~59 M): a few hundred thousand
    macs = count_macs(exported.files["int8"])
    assert 0.8e6 < macs < 2.0e6


def test_profile_reports_every_figure(tiny_run, exported):
    p = profile_run(tiny_run, exported.folder, runs=50, tflm_images=4)
    assert p["flash_bytes"] == exported.files["int8"].stat().st_size
    assert p["tflm_arena_bytes"] > 0 and p["tflm_agreement"]["max_abs_diff_vs_litert_reference"] <= 2
    assert p["latency_ms"]["int8"]["runs"] == 50 and p["latency_ms"]["int8"]["median"] > 0
    assert set(p["accuracy"]) == {"keras", "float32", "int8", "int8_reference"}
    assert json.loads((exported.folder / "profile.json").read_text())["macs"] == p["macs"]


def test_a_crashing_tflm_child_becomes_a_clear_error(tmp_path, monkeypatch):
    real_run = subprocess.run

    def abort_child(cmd, **kwargs):
        return real_run([sys.executable, "-c", "import os; os.abort()"], **kwargs)

    monkeypatch.setattr(tflm.subprocess, "run", abort_child)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"\0" * 16)
    with pytest.raises(TFLMCrash, match="crashed \\(SIGABRT\\)"):
        run_tflm(model, 4096)


def test_missing_operator_is_named():
    log = "Didn't find op for builtin opcode 'HARD_SWISH' version '1'"
    assert _unsupported_op(log) == "HARD_SWISH"


def test_garbage_model_is_never_reported_as_running(tmp_path):
    model = tmp_path / "garbage.tflite"
    model.write_bytes(b"not a flatbuffer at all" * 10)
    try:
        run = run_tflm(model, 8192)
    except TFLMError as exc:
        assert "garbage.tflite" in str(exc)
    else:
        assert not run.ok and run.error


def test_predictor_load_names_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="not a run folder"):
        Predictor.load(tmp_path)
    (tmp_path / "m.tflite").write_bytes(b"x")
    with pytest.raises(DataError, match="no model_card.json"):
        Predictor.load(tmp_path / "m.tflite")
    with pytest.raises(DataError, match="not a run folder, .keras or .tflite"):
        Predictor.load(tmp_path / "notes.txt")


def test_a_model_that_crashes_xnnpack_falls_back_to_builtin_kernels(exported, monkeypatch):
    monkeypatch.setattr(runtimes, "xnnpack_allocates", lambda path: False)
    int8 = Predictor.load(exported.files["int8"])
    assert int8.kind == "tflite-int8-builtin"
    x = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    reference = Predictor.load(exported.files["int8"], reference_kernels=True)
    # the builtin optimised kernels round differently from the reference ones: a few steps of 1/256
    assert np.abs(int8.raw(x).astype(int) - reference.raw(x).astype(int)).max() <= 8


def test_xnnpack_probe_survives_a_crashing_child(tmp_path, monkeypatch):
    real_run = subprocess.run
    monkeypatch.setattr(runtimes.subprocess, "run",
                        lambda cmd, **kw: real_run([sys.executable, "-c", "import os; os.abort()"], **kw))
    assert runtimes.xnnpack_allocates(tmp_path / "any.tflite") is False


def test_evaluate_scores_slice_context_on_the_runs_test_patients(tiny_run, tmp_path, capsys):
    meta = RunFolder.open(tiny_run).meta
    args = ["evaluate", str(tiny_run), meta["dataset"]["source"], "--unseen-only", "--runs", str(tmp_path), "--quiet"]
    assert main(args) == 0
    assert "slice context: AUC" in capsys.readouterr().out
    (folder,) = tmp_path.iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    d = Predictor.load(tiny_run).decision
    assert metrics["decision"]["context"]["slice_threshold"] == d.context.slice_threshold
    assert metrics["context_high_sensitivity"]["threshold"] == d.context.slice_threshold
    run_metrics = json.loads((tiny_run / "metrics.json").read_text())
    # the same test patients, the same model: evaluate reproduces what training measured
    assert metrics["context_default"]["auc"] == pytest.approx(run_metrics["context_default"]["auc"], abs=1e-6)
    assert metrics["default"]["auc"] == pytest.approx(run_metrics["default"]["auc"], abs=1e-6)
    assert "slice context, high-sensitivity threshold" in (folder / "report.html").read_text()


@pytest.mark.integration
def test_a_collapsed_model_is_exported_only_with_a_loud_warning(tiny_run, tmp_path, caplog) -> None:
    """A model whose output is the same for every slice (output layer zeroed) still exports, but the
    log and both model cards say it has not learnt."""
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export*"))
    model = keras.models.load_model(RunFolder.open(run).model_file)
    out = model.get_layer("head").get_layer("hemorrhage")
    out.set_weights([np.zeros_like(w) for w in out.get_weights()])
    model.save(RunFolder.open(run).model_file)
    with caplog.at_level(logging.WARNING, logger="ichedge"):
        result = export_run(run, calibration_images=20)
    assert result.card["warning"].startswith("COLLAPSED MODEL")
    assert "COLLAPSED MODEL" in caplog.text
    assert "COLLAPSED MODEL" in (result.folder / "model_card.md").read_text()


def test_a_model_that_learnt_exports_without_a_collapse_warning(tiny_export) -> None:
    assert "warning" not in tiny_export.card
