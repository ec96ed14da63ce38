import json

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ichedge.data import DataError
from ichedge.evaluation import is_collapsed
from ichedge.distill import (UNLABELLED, DistillConfig, Targets, attention_loss, attention_map, fit_student,
                             normalised, resize_maps, soft_loss, teacher_maps, teacher_targets)
from ichedge.model import Weights, build_model
from ichedge.cli import main
from ichedge.export import training_sources
from tests.conftest import synthetic_slice, write_manifest


def _images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic slices, every other one with a bright blob (a bleed), as 3-channel uint8 inputs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.stack([synthetic_slice(rng, bool(b), size) for b in y])
    return np.repeat(x[..., None], 3, axis=-1), y


def test_soft_loss_is_zero_only_where_the_student_agrees():
    z = np.array([-6.0, -1.0, 0.0, 0.5, 4.0], np.float32)
    for t in (1.0, 2.0, 4.0):
        assert np.allclose(soft_loss(z, z, t).numpy(), 0.0, atol=1e-6)
    off = soft_loss(z, z + 1.0, 2.0).numpy()
    assert (off > 1e-4).all()
    # further from the teacher costs more
    assert (soft_loss(z, z + 2.0, 2.0).numpy() > off).all()


def test_attention_map_and_its_normalisation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    m = attention_map(a).numpy()
    assert m.shape == (3, 4, 5) and np.allclose(m, (a**2).mean(-1), atol=1e-6)
    assert np.allclose(np.linalg.norm(normalised(m).numpy(), axis=1), 1.0, atol=1e-5)
    # only where, not how strongly: a scaled copy matches, a different map does not
    assert np.allclose(attention_loss(m, 7.0 * m).numpy(), 0.0, atol=1e-6)
    other = attention_map(rng.normal(size=(3, 4, 5, 6))).numpy()
    d = attention_loss(m, other).numpy()
    assert (d > 1e-3).all() and (d <= 2.0 + 1e-6).all()


def test_resize_maps_averages_cells():
    maps = np.arange(2 * 14 * 14, dtype=np.float32).reshape(2, 14, 14)
    small = resize_maps(maps, (7, 7))
    assert small.shape == (2, 7, 7)
    assert np.allclose(small, maps.reshape(2, 7, 2, 7, 2).mean((2, 4)))
    assert np.array_equal(resize_maps(maps, (14, 14)), maps)


def test_is_collapsed_detects_constant_outputs():
    rng = np.random.default_rng(0)
    assert is_collapsed(np.full(100, 0.37))
    assert is_collapsed(0.5 + rng.normal(0, 1e-5, 100))  # constant up to noise
    assert is_collapsed(np.tile([0.1, 0.9], 50))  # two values: a threshold, not a score
    assert not is_collapsed(rng.uniform(size=100))
    # a model whose output layer ignores its features scores every image alike
    model = build_model(0.05, 32, Weights("random"), head="paper")
    out = model.get_layer("head").get_layer("hemorrhage")
    out.set_weights([np.zeros_like(out.get_weights()[0]), np.array([0.3], np.float32)])
    x, _ = _images(12)
    assert is_collapsed(model.predict(x.astype("float32"), verbose=0))


@pytest.fixture(scope="module")
def small_teacher():
    """A 32x32 multilevel teacher (random weights, seeded) and its maps of 24 synthetic images."""
    teacher = build_model(0.35, 32, Weights("random"), seed=0, head="multilevel")
    x, y = _images(24)
    return teacher, x, y, teacher_maps(teacher, x)


def test_teacher_targets_do_not_read_labels_outside_the_training_rows(small_teacher):
    teacher, x, y, maps = small_teacher
    assert maps.features.shape[0] == 24 and maps.attention.shape == (24, 2, 2)  # block_13 at stride 16
    train = np.arange(16)
    base = teacher_targets(teacher, maps, y, train, x[train])
    flipped = y.copy()
    flipped[16:] = 1 - flipped[16:]  # the test rows' labels
    again = teacher_targets(teacher, maps, flipped, train, x[train])
    assert np.array_equal(base.logits, again.logits) and np.array_equal(base.attention, again.attention)
    # while the training rows' labels do change them
    moved = y.copy()
    moved[:4] = 1 - moved[:4]
    assert not np.allclose(base.logits, teacher_targets(teacher, maps, moved, train, x[train]).logits)
    # an unlabelled row (label UNLABELLED) outside the training rows is scored all the same
    y_unl = y.copy()
    y_unl[20:] = UNLABELLED
    assert np.array_equal(base.logits, teacher_targets(teacher, maps, y_unl, train, x[train]).logits)


def test_teacher_targets_refuse_a_training_split_with_one_class(small_teacher):
    teacher, x, y, maps = small_teacher
    train = np.flatnonzero(y[:8] == 0)
    with pytest.raises((ValueError, DataError)):
        teacher_targets(teacher, maps, y, train, x[train])


@pytest.mark.integration
def test_student_moves_towards_the_teachers_scores():
    """Only the teacher's scores (no labels, no attention term): the trained student ranks the
    images as the teacher does, and disagrees with it less than its untrained start."""
    rng = np.random.default_rng(0)
    n = 128
    y = np.arange(n) % 2
    x = np.clip(rng.normal(np.where(y == 1, 170.0, 70.0)[:, None, None, None], 25.0, (n, 32, 32, 3)), 0, 255)
    x = x.astype(np.uint8)  # separable by brightness; only the teacher's scores say which is which
    logits = np.where(y == 1, 3.0, -3.0).astype(np.float32)
    targets = Targets(logits, np.ones((n, 1, 1), np.float32))
    unlabelled = np.full(n, UNLABELLED)
    config = DistillConfig(0.05, size=32, epochs=20, batch_size=16, learning_rate=3e-3, temperature=1.0, hard=0.0,
                           attention=0.0, augment=False)
    # The student before training: built as fit_student builds it, from the same seed.
    keras.utils.set_random_seed(config.seed)
    start = build_model(config.alpha, config.size, Weights("random"), config.neurons, config.dropout, config.seed,
                        head="paper")
    student, history = fit_student(config, x, unlabelled, targets)

    def disagreement(model) -> tuple[float, np.ndarray]:
        p = np.clip(model.predict(x.astype("float32"), verbose=0).reshape(-1), 1e-6, 1 - 1e-6)
        return float(np.mean(soft_loss(logits, np.log(p / (1 - p))).numpy())), p

    before, _ = disagreement(start)
    after, p = disagreement(student)
    assert history["soft"][-1] < 0.5 * history["soft"][0]
    assert after < 0.7 * before
    assert roc_auc_score(y, p) > 0.95 and not is_collapsed(p)  # ranks as the teacher does


@pytest.mark.integration
def test_a_distilled_student_is_a_run_folder_naming_its_unlabelled_data_and_licence(tmp_path, synthetic12) -> None:
    """`ichedge distill` on the 12 synthetic patients, with 10 slices of another source as unlabelled
    data: a run folder whose config and model-card sources carry that source's licence and role."""
    other = write_manifest(tmp_path / "other", patients=3, seed=1)
    code = main(["distill", "--data", str(synthetic12), "--size", "32", "--epochs", "1", "--unlabelled", str(other),
                 "--unlabelled-count", "10", "--runs", str(tmp_path / "runs"), "--quiet"])
    assert code == 0
    (run,) = (tmp_path / "runs").iterdir()
    meta = json.loads((run / "config.json").read_text())
    assert meta["distillation"]["unlabelled_slices"] == 10 and meta["weights"]["source"] == "random"
    (extra,) = [s for s in meta["dataset"]["sources"] if "role" in s]
    assert extra["slices"] == 10 and extra["role"].startswith("unlabelled")
    assert {"role": extra["role"]}.items() <= training_sources(meta["dataset"])[-1].items()
    assert json.loads((run / "metrics.json").read_text())["default"]["n"] > 0
