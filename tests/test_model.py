import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from ichedge.heads import HEADS, head_of
from ichedge.model import build_model, feature_extractor, resolve_weights, sha256, weights_filename

SHARED_SHA_128 = "7a3b4f7620361d61fe92d97941b79617215b2858ac7cd28884fe726b2cef1279"


def test_alpha_035_resolves_to_bundled_imagenet_file_nearest_resolution():
    w = resolve_weights(0.35, 96)
    assert w.source == "bundled" and w.pretrained
    assert w.path.endswith("0.35_128_no_top.h5") and w.sha256 == SHARED_SHA_128
    assert resolve_weights(0.35, 224).path.endswith("0.35_224_no_top.h5")


def test_widths_without_weights_go_random_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        w = resolve_weights(0.05, 96)
    assert w.source == "random" and not w.pretrained
    assert "no ImageNet weights exist for alpha 0.05" in w.note
    assert "RANDOM WEIGHTS" in caplog.text


def test_keras_download_path_uses_the_cache(tmp_path):
    # A file already in Keras's cache is what a successful download leaves: no network needed.
    bundled = Path(resolve_weights(0.35, 128).path)
    cache = tmp_path / "keras"
    (cache / "models").mkdir(parents=True)
    shutil.copy(bundled, cache / "models" / weights_filename(0.5, 160))
    w = resolve_weights(0.5, 160, cache_dir=cache)
    assert w.source == "keras-download" and w.sha256 == sha256(bundled)


def test_failed_download_falls_back_to_random_and_says_why(tmp_path, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    w = resolve_weights(0.75, 96, cache_dir=tmp_path)
    assert w.source == "random" and "could not be downloaded" in w.note


def test_user_file_and_explicit_random(tmp_path):
    path = resolve_weights(0.35, 96).path
    assert resolve_weights(0.35, 96, path).source == "file"
    assert resolve_weights(0.35, 96, "random").source == "random"
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        resolve_weights(0.35, 96, tmp_path / "missing.h5")


def test_model_loads_imagenet_weights_and_has_the_paper_head():
    w = resolve_weights(0.35, 96)
    model = build_model(0.35, 96, w, neurons=8, dropout=0.1)
    assert model.input_shape == (None, 96, 96, 3) and model.output_shape == (None, 1)
    head = model.get_layer("head")
    assert head.get_layer("dense").units == 8 and head.get_layer("dropout").rate == 0.1
    import h5py

    with h5py.File(w.path) as f:
        stored = f["Conv1/Conv1/kernel"][()]
    kernel = model.get_layer("backbone").get_layer("Conv1").kernel.numpy()
    assert np.allclose(kernel, stored)
    random = build_model(0.35, 96, resolve_weights(0.35, 96, "random"))
    assert not np.allclose(kernel, random.get_layer("backbone").get_layer("Conv1").kernel.numpy())


def test_width_multiplier_shrinks_the_model():
    random = resolve_weights(0.1, 96, "random")
    small = build_model(0.1, 96, random).count_params()
    large = build_model(0.5, 96, random).count_params()
    assert small < large / 3


def test_model_outputs_probabilities_from_pixels():
    model = build_model(0.35, 96, resolve_weights(0.35, 96))
    x = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    p = model.predict(x, verbose=0)
    assert p.shape == (2, 1) and np.all((p > 0) & (p < 1))
    assert feature_extractor(model).predict(x, verbose=0).shape == (2, 1280)


def test_trim_drops_the_last_wide_convolution_and_keeps_imagenet_weights():
    w = resolve_weights(0.35, 96)
    full = build_model(0.35, 96, w)
    trimmed = build_model(0.35, 96, w, trim=True)
    assert feature_extractor(trimmed).output_shape == (None, 112)  # 320 * 0.35 channels
    # Conv_1 (112 -> 1280, 1x1, no bias) and its batch norm, and a smaller head
    saved = 112 * 1280 + 4 * 1280 + (1280 - 112) * 8
    assert full.count_params() - trimmed.count_params() == saved
    a = full.get_layer("backbone").get_layer("block_16_project").kernel.numpy()
    b = trimmed.get_layer("backbone").get_layer("block_16_project").kernel.numpy()
    assert np.array_equal(a, b)


def test_multilevel_head_pools_block_13_and_block_16_and_drops_the_last_convolution():
    import keras

    w = resolve_weights(0.35, 96)
    paper = build_model(0.35, 96, w)
    multilevel = build_model(0.35, 96, w, head="multilevel")
    x = np.random.default_rng(0).uniform(0, 255, (3, 96, 96, 3)).astype("float32")
    full = paper.get_layer("backbone")
    maps = keras.Model(full.input, [full.get_layer(n).output for n in ("block_13_expand_relu", "block_16_project_BN")])
    b13, b16 = maps.predict(x / 127.5 - 1, verbose=0)
    expected = np.c_[b13.mean((1, 2)), b16.mean((1, 2)), b16.max((1, 2))]  # 192 + 112 + 112 at alpha 0.35
    got = feature_extractor(multilevel).predict(x, verbose=0)
    assert got.shape == (3, 416) and np.allclose(got, expected, atol=1e-4)
    names = {layer.name for layer in multilevel.get_layer("backbone").layers}
    assert "Conv_1" not in names and "Conv_1" in {layer.name for layer in full.layers}
    assert multilevel.count_params() < paper.count_params() - 112 * 1280
    with pytest.raises(ValueError, match="unknown head 'mlp'; choose one of: paper, multilevel"):
        build_model(0.35, 96, w, head="mlp")
    with pytest.raises(ValueError, match="trim applies to heads that read the backbone's last map"):
        build_model(0.35, 96, w, trim=True, head="multilevel")
    assert head_of(paper) is HEADS.get("paper") and head_of(multilevel) is HEADS.get("multilevel")
    with pytest.raises(ValueError, match="carries none of this version's heads"):
        head_of(maps)


def test_weights_file_names_are_keras_own() -> None:
    # Keras writes alpha as a float: the shared alpha-1.0 file is ..._1.0_224_no_top.h5, not ..._1_224_...
    assert weights_filename(1.0, 224) == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert weights_filename(0.35, 96).endswith("_0.35_96_no_top.h5")
