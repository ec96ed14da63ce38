"""The cross-site protocol: a home-only and a two-site model per fold, each site's held-out patients."""

import csv
import json

import numpy as np
import pytest

import ichedge.crosssite as crosssite
from ichedge.data import read_manifest
from ichedge.training import TrainConfig
from tests.conftest import write_manifest


@pytest.mark.integration
def test_home_only_models_never_see_the_other_site_and_every_patient_is_tested_once(tmp_path, monkeypatch):
    home = read_manifest(write_manifest(tmp_path / "home", patients=12))
    other = read_manifest(write_manifest(tmp_path / "other", patients=12, seed=1))
    trained_on = []
    real_fit = crosssite.fit

    def spy(config, inputs, split, **kwargs):  # the real training, recording which sites it trained on
        trained_on.append({s.split(":")[0] for s in kwargs["groups"][np.concatenate([split.train, split.val])]})
        return real_fit(config, inputs, split, **kwargs)

    monkeypatch.setattr(crosssite, "fit", spy)
    result = crosssite.cross_site(TrainConfig(size=32, head="multilevel"), home, other, folds=2, n_boot=100)
    assert trained_on == [{"home"}, {"home", "other"}] * 2
    for proto in crosssite.PROTOCOLS:
        for site, s in result.summary[proto].items():
            assert (s["patients"], s["slices"]) == (12, 72), f"{proto} on {site}: each patient tested once"
            pooled = s["pooled"]
            assert pooled["auc"]["low"] <= pooled["auc"]["value"] <= pooled["auc"]["high"]
        shipped = {s["threshold"]["shipped"] for s in result.summary[proto].values()}
        assert len(shipped) == 1, "one shipped threshold per protocol, whatever the test site"
    folder = crosssite.write_cross_site(tmp_path / "runs", result)
    rows = list(csv.DictReader((folder / "predictions.csv").open()))
    assert len(rows) == 2 * 144 and {r["site"] for r in rows} == {"home", "other"}
    assert [s["name"] for s in json.loads((folder / "results.json").read_text())["sources"]] == ["home", "other"]
    md = (folder / "results.md").read_text()
    assert md.count("| home only |") == 2 and md.count("| home + other |") == 2
