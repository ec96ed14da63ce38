import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import keras

from ichedge.data import Split, read_manifest, train_val_test_split
from ichedge.explain import GradCAM
from ichedge.heads import INT8_STEP_IMAGES, Taps, class_weights, fit_logistic, tap_int8_steps
from ichedge.model import build_model, feature_extractor, resolve_weights
from ichedge.runs import RunFolder, new_folder
from ichedge.runtimes import Predictor
from ichedge.training import TrainConfig, check_split_usable, remap_split, train, unfreeze_top
from tests.conftest import write_manifest

RUN_FILES = {"config.json", "model.keras", "history.csv", "metrics.json", "predictions.npz",
             "plots/learning_curves.png", "plots/confusion_0.5.png", "plots/confusion_high_sensitivity.png",
             "plots/roc.png", "plots/precision_recall.png", "plots/reliability.png", "report.html"}


def _files(run):
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def test_class_weights_balance_the_classes():
    w = class_weights(np.array([0] * 7 + [1]))
    assert w[1] == pytest.approx(4.0) and w[0] == pytest.approx(8 / 14)
    assert 7 * w[0] == pytest.approx(1 * w[1])


def test_remap_split_drops_unloaded_images():
    split = Split(np.array([0, 1, 2]), np.array([3]), np.array([4, 5]))
    local = remap_split(split, np.array([0, 2, 3, 5]))
    assert local.train.tolist() == [0, 1] and local.val.tolist() == [2] and local.test.tolist() == [3]


def test_run_dirs_never_collide(tmp_path):
    with new_folder(tmp_path, "x", stamp=False) as first:
        (first.tmp / "keep.txt").write_text("earlier run")
    with new_folder(tmp_path, "x", stamp=False) as second:
        (tmp_path / "x-2").mkdir()  # another run took the next free name while this one was written
        (second.tmp / "model.keras").write_text("new run")
    assert first.path == tmp_path / "x" and second.path == tmp_path / "x-3"
    assert (second.path / "model.keras").read_text() == "new run"
    assert (first.path / "keep.txt").read_text() == "earlier run" and not any((tmp_path / "x-2").iterdir())
    assert not second.tmp.exists()


def test_unfreeze_top_keeps_batch_norm_frozen():
    model = build_model(0.35, 96, resolve_weights(0.35, 96))
    backbone = model.get_layer("backbone")
    unfreeze_top(backbone, "block_16")
    trainable = [l for l in backbone.layers if l.trainable and l.weights]
    assert trainable and all(l.name.startswith(("block_16", "Conv_1")) for l in trainable)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in trainable)
    with pytest.raises(ValueError, match="no backbone layer"):
        unfreeze_top(backbone, "nonsense")


def test_from_scratch_training_writes_a_complete_run(interrupted_sweep):
    run = interrupted_sweep.folder / "32px-a0.1-gray-context"  # random weights: trained from scratch, 2 epochs
    assert RUN_FILES <= _files(run)
    meta = json.loads((run / "config.json").read_text())
    assert meta["weights"]["source"] == "random" and "RANDOM WEIGHTS" in meta["warning"]
    assert meta["preprocessing"]["size"] == 32
    with (run / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {r["phase"] for r in rows} == {"from-scratch"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"default", "high_sensitivity", "validation", "study_high_sensitivity",
                            "intervals", "calibration", "context_skipped"}
    ci = metrics["intervals"]
    assert ci["resampled"] == "patients"
    for point in ("default", "high_sensitivity"):
        for m in ("sensitivity", "specificity"):
            assert ci[point][m]["low"] <= ci[point][m]["value"] <= ci[point][m]["high"]
    assert not list(interrupted_sweep.folder.parent.glob(".*")), "no temporary folder left behind"


@pytest.mark.integration
def test_transfer_learning_on_real_ct_subset(real_subset, tmp_path):
    ds = read_manifest(real_subset)
    config = TrainConfig(size=96, alpha=0.35, epochs=8, fine_tune_epochs=1, fine_tune_from="block_16")
    split = train_val_test_split(ds, seed=0)
    run, result = train(config, ds, split, tmp_path, progress=False)
    meta = json.loads((run / "config.json").read_text())
    assert meta["weights"]["source"] == "bundled"
    parts = {k: {key.split("/")[0] for key in v} for k, v in meta["split"].items()}
    assert not (parts["train"] & parts["test"]) and not (parts["val"] & parts["test"])
    assert not (parts["train"] & parts["val"])
    assert len(parts["train"] | parts["val"] | parts["test"]) == 16
    phases = [row["phase"] for row in csv.DictReader((run / "history.csv").open())]
    assert phases == ["frozen"] * 8 + ["fine-tune"]
    losses = [float(r["loss"]) for r in csv.DictReader((run / "history.csv").open())][:8]
    assert losses[-1] < losses[0], "the frozen-phase head learns on real CT"
    m = json.loads((run / "metrics.json").read_text())
    assert m["validation"]["sensitivity"] >= 0.95, "the threshold is set on validation for the target"
    assert m["high_sensitivity"]["threshold"] <= m["default"]["threshold"]
    assert m["default"]["n"] == len(meta["split"]["test"])


def _int8_steps(features, widths):
    """Each tap's int8 step, and what per-tensor int8 quantisation of each tap leaves of the features."""
    out, steps, start = features.copy(), [], 0
    for width in widths:
        part = features[:, start:start + width]
        low, step = part.min(), (part.max() - part.min()) / 255
        out[:, start:start + width] = np.round((part - low) / step) * step + low
        steps.append(step)
        start += width
    return steps, out


def test_logistic_head_does_not_lean_on_what_int8_cannot_resolve():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    wide = rng.normal(0, 3, (400, 3)) + y[:, None]
    tiny = rng.normal(0, 1e-3, (400, 1)) + 3e-3 * y[:, None]  # telling, but far below its tap's int8 step
    other = rng.normal(0, 1, (400, 3)) + 0.5 * y[:, None]
    f = np.c_[wide, tiny, other]
    steps, quantised = _int8_steps(f, [4, 3])
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    plain = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000, class_weight="balanced")).fit(f, y)
    assert np.abs(plain.predict_proba(f)[:, 1] - plain.predict_proba(quantised)[:, 1]).max() > 0.5
    w, b = fit_logistic(f, y, Taps([4, 3], steps))
    assert np.abs(sigmoid(f @ w + b) - sigmoid(quantised @ w + b)).max() < 0.02
    # where every channel varies more than its step, it is the plain standardised regression
    w, b = fit_logistic(other, y, Taps([3], _int8_steps(other, [3])[0]))
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=5000, class_weight="balanced"))
    assert np.allclose(sigmoid(other @ w + b), reference.fit(other, y).predict_proba(other)[:, 1], atol=1e-6)
    with pytest.raises(ValueError, match="do not fit 7 features"):
        fit_logistic(f, y, Taps([3], [0.1]))


def test_multilevel_run_with_context_serves_the_fitted_regression_and_explains_it(multilevel_run):
    run, result, split, ds = multilevel_run.run, multilevel_run.result, multilevel_run.split, multilevel_run.dataset
    assert run.name.endswith("-multilevel-context") and RUN_FILES <= _files(run)
    assert [r["phase"] for r in csv.DictReader((run / "history.csv").open())] == ["frozen"], "fitted in one go"
    assert np.isfinite(result.metrics["context_default"]["auc"]) and "test_context" in result.probabilities
    model = Predictor.load(run).model
    test = RunFolder.open(run).split_part("test")[0]
    p = model.predict(test.x.astype("float32"), verbose=0).reshape(-1)
    assert np.allclose(p, result.probabilities["test"], atol=1e-5), "the saved model is the evaluated one"
    # its head is the regression fit_logistic finds on the training images' pooled taps (all of
    # them set the int8 steps: fewer than INT8_STEP_IMAGES)
    y = np.array([r.label for r in ds.records])
    assert len(split.train) <= INT8_STEP_IMAGES
    taps = Taps([192, 112, 112], tap_int8_steps(model, RunFolder.open(run).split_part("train")[0].x))
    w, b = fit_logistic(result.features[split.train], y[split.train], taps)
    f = feature_extractor(model).predict(test.x.astype("float32"), verbose=0)
    assert np.allclose(p, 1 / (1 + np.exp(-(f @ w + b))), atol=1e-4)
    heat, prob = GradCAM(model)(test.x)
    assert heat.shape == (len(test.x), 64, 64) and (heat >= 0).all()
    assert np.ptp(heat.reshape(len(heat), -1), axis=1).max() > 0, "a map with places, not one value"
    assert np.allclose(prob, p, atol=1e-4)


@pytest.mark.integration
def test_multilevel_head_starts_fine_tuning(tmp_path):
    ds = read_manifest(write_manifest(tmp_path / "data", patients=8))
    split = train_val_test_split(ds, test=0.25, val=0.25, seed=0)
    _, tuned = train(TrainConfig(size=64, alpha=0.35, head="multilevel", fine_tune_epochs=1, fine_tune_from="block_16"),
                     ds, split, tmp_path / "runs", progress=False)
    assert tuned.history["phase"] == ["frozen", "fine-tune"]


def test_multilevel_head_trains_from_scratch(slice_sweep):
    run = RunFolder.open(slice_sweep.folder / "32px-a0.1-gray-multilevel")
    assert run.meta["weights"]["source"] == "random"
    assert [r["phase"] for r in csv.DictReader((run.path / "history.csv").open())] == ["from-scratch"] * 2
    model = keras.models.load_model(run.model_file)
    assert model.get_layer("head").get_layer("tap0_weights").get_weights()[0].any()


def test_config_rejects_impossible_settings():
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="target_sensitivity"):
        TrainConfig(target_sensitivity=1.5)
    with pytest.raises(ValueError, match="channel mode"):
        TrainConfig(channels="rgb")


def test_unusable_splits_fail_before_training():
    y = np.array([0, 0, 1, 1, 0, 0])
    check_split_usable(y, Split(np.array([0, 2]), np.array([1, 3]), np.array([4, 3])))
    with pytest.raises(Exception, match="val split has only one class"):
        check_split_usable(y, Split(np.array([0, 2]), np.array([1, 4]), np.array([3, 5])))
    with pytest.raises(Exception, match="test split is empty"):
        check_split_usable(y, Split(np.array([0, 2]), np.array([1, 3]), np.array([], dtype=int)))


def test_run_folder_appears_whole_or_not_at_all(tmp_path):
    with pytest.raises(RuntimeError):
        with new_folder(tmp_path, "evaluate") as folder:
            (folder.tmp / "half.json").write_text("{")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with new_folder(tmp_path, "evaluate") as first:
        (first.tmp / "a.txt").write_text("a")
    with new_folder(tmp_path, "evaluate") as second:
        (second.tmp / "b.txt").write_text("b")
    assert first.path != second.path and (first.path / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, second.path.name])


def test_sigterm_removes_a_half_written_run_folder(tmp_path):
    """`kill` during a run must not leave a hidden temporary folder (the CLI installs this handler)."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from ichedge.cli import exit_cleanly_on_sigterm\n"
        "from ichedge.runs import new_folder\n"
        "exit_cleanly_on_sigterm()\n"
        "with new_folder(Path(sys.argv[1]), 'run') as folder:\n"
        "    (folder.tmp / 'half.txt').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == 143, proc.stderr.decode()[-500:]
    assert list(tmp_path.iterdir()) == [], "the temporary folder was removed, nothing was renamed into place"
