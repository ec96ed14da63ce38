"""Every registered component honours its interface: a new one is covered the day it is registered."""

import numpy as np
import pytest

from ichedge.channels import CHANNEL_MODES, NEXT, PREVIOUS
from ichedge.context import STAGES
from ichedge.explain import GradCAM
from ichedge.heads import HEADS, head_of
from ichedge.model import build_model, feature_extractor, resolve_weights
from ichedge.preprocess import Preprocessing, prepare_slice
from ichedge.registry import Registry
from ichedge.runtimes import RUNTIMES, Predictor
from ichedge.training import TrainConfig


def test_a_registry_names_its_choices_and_refuses_a_second_entry_of_a_name():
    things = Registry("thing")
    things.register("a")(object)
    assert things.names() == ("a",) and "a" in things and "b" not in things
    with pytest.raises(ValueError, match="thing 'a' is registered twice"):
        things.register("a")(object)
    with pytest.raises(ValueError, match="unknown thing 'b'; choose one of: a"):
        things.get("b")


@pytest.mark.parametrize("name", HEADS.names())
def test_every_head_builds_fits_refits_and_explains(name):
    head = HEADS.get(name)
    assert head.name == name and head.help and head.describe(8, 0.1, False) and head.frozen_training(3)
    model = build_model(0.35, 32, resolve_weights(0.35, 32), head=name)
    assert head_of(model) is head
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3)).astype(np.uint8)
    y = np.array([0, 1] * 6)
    features = feature_extractor(model).predict(x.astype("float32"), verbose=0)
    fitted = head.fit(model, features, y, np.arange(8), np.arange(8, 12), x, TrainConfig(size=32, epochs=1).fit_settings)
    assert {"loss", "val_loss"} <= set(fitted.history)
    p = model.predict(x.astype("float32"), verbose=0).reshape(-1)
    assert ((p >= 0) & (p <= 1)).all()
    assert fitted.refit(np.arange(6), np.arange(6, 12), 0).shape == (6,)
    heat, prob = GradCAM(model)(x[:2])
    assert heat.shape == (2, 32, 32) and np.allclose(prob, p[:2], atol=1e-4)


@pytest.mark.parametrize("name", CHANNEL_MODES.names())
def test_every_channel_mode_makes_three_uint8_planes_from_what_it_declares(name):
    mode = CHANNEL_MODES.get(name)
    assert mode.name == name and mode.help and mode.needs <= {"hu", "neighbours"}
    rng = np.random.default_rng(0)
    images = {w: rng.random((40, 40)).astype(np.float32) for w in mode.windows}
    if "neighbours" in mode.needs:
        images |= {PREVIOUS: rng.random((40, 40)).astype(np.float32), NEXT: rng.random((40, 40)).astype(np.float32)}
    x = prepare_slice(images, Preprocessing(32, name, crop=False))
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    assert mode.single_image == (mode.windows == ("brain",) and not mode.needs)


def test_every_runtime_opens_its_own_suffix_and_every_stage_declares_its_needs():
    assert {runtime.suffix for runtime in RUNTIMES} == {".keras", ".tflite"}
    assert all(issubclass(runtime, Predictor) for runtime in RUNTIMES)
    for stage in STAGES:
        assert stage.needs and callable(stage.fit) and callable(stage.from_json)
