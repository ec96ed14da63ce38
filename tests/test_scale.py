"""Archive-scale triage: plan, parts and resume locally, and on a real local Ray cluster the same
slices, scores and worklist bit for bit, with an actor killed mid-job."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from ichedge.cli import main
from ichedge.data import read_manifest, train_val_test_split
from ichedge.intake import gather_sources, prepare_sources
from ichedge.model import build_model, resolve_weights
from ichedge.preprocess import load_inputs
from ichedge.runs import PREDICT_PARTS, WORKLIST, RunFolder
from ichedge.runtimes import Predictor
from ichedge.archive import plan, read_headers
from ichedge.scale import Job, LocalEngine, RayEngine, RayExecutor, cached, predict_archive
from ichedge.training import TrainConfig, compute_features, train
from ichedge.triage import triage
from ichedge.tune import Candidate, Outcome
from ichedge.tune import Job as TuneJob
from tests.conftest import ct_phantom, synthetic_slice, write_ct_dicom


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> str:
    """Three DICOM series (files shuffled across folders), two image folders and a stray file."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(4)
    for p in range(3):
        for s in (3, 1, 5, 2, 4):
            write_ct_dicom(root / f"dicom{s % 2}" / f"p{p}_{s}.dcm", ct_phantom(rng, p == 1 and s in (2, 3)), z=2.5 * s,
                           instance=s, study=f"1.2.826.0.1.3680043.8.498.7{p}",
                           series=f"1.2.826.0.1.3680043.8.498.7{p}.1")
    for folder in ("study-b", "study-a"):
        (root / folder).mkdir()
        for s in (10, 2, 1):
            (root / folder / f"slice{s}.png").write_bytes(png(synthetic_slice(rng, folder == "study-a" and s == 2)))
    (root / "notes.txt").write_text("not an image")
    return str(root)


def same(a, b) -> None:
    """Two triage results agree bit for bit: every slice, score and flag, and the ranked worklist."""
    assert [(s.file, s.study, s.index) for s in a.slices] == [(s.file, s.study, s.index) for s in b.slices]
    assert np.array_equal([s.probability for s in a.slices], [s.probability for s in b.slices])
    assert [(s.flagged, s.ood_score) for s in a.slices] == [(s.flagged, s.ood_score) for s in b.slices]
    assert a.studies == b.studies and sorted(a.errors) == sorted(b.errors)


@pytest.fixture(scope="module")
def local(served_run, archive):
    """ichedge predict's own path on the archive: the reference every engine must match."""
    predictor = Predictor.load(served_run.joinpath("export", "model_int8.tflite"))
    sources, missing = gather_sources([archive])
    prepared = prepare_sources(sources, predictor.preprocessing)
    prepared.errors[:0] = missing
    return triage(prepared, predictor), predictor


def test_units_are_the_groups_prepare_sources_makes_in_its_order(archive):
    units, errors = plan(read_headers([s.name for s in gather_sources([archive])[0]]))
    assert [len(u.files) for u in units] == [5, 5, 5, 3, 3] and len(errors) == 1 and "notes.txt" in errors[0]
    assert [os.path.basename(f) for f in units[0].files] == [f"p0_{s}.dcm" for s in range(1, 6)]  # along z
    assert [os.path.basename(f) for f in units[3].files] == ["slice1.png", "slice2.png", "slice10.png"]
    assert "study-a" in units[3].files[0]  # folders in natural name order, as prepare_sources takes images


def test_the_local_engine_matches_predict_and_resumes_from_its_parts(local, archive, served_run, tmp_path):
    reference, predictor = local
    model = predictor.source
    done, _ = predict_archive([archive], model, tmp_path)
    same(done.result, reference)
    assert done.units == 5 and done.resumed == 0 and done.files == 22 and len(done.digests) == 21
    again, _ = predict_archive([archive], model, tmp_path)
    assert again.resumed == 5
    same(again.result, reference)
    job = Job.of([archive], model, tmp_path, None)
    units, _ = plan(read_headers([s.name for s in gather_sources([archive])[0]]))
    job.part(units[1]).unlink()  # a unit that never finished is scored again, the rest is not
    scored = []
    engine = LocalEngine()
    original = engine.scores
    engine.scores = lambda todo, predictor, j: (scored.extend(todo) or original(todo, predictor, j))
    third, _ = predict_archive([archive], model, tmp_path, engine)
    assert scored == [units[1]] and third.resumed == 4
    same(third.result, reference)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray: two workers' worth of logical CPUs, shared by this module's tests."""
    import ray  # the scale extra, part of the dev extra that make test installs

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_worklist_bit_for_bit_with_an_actor_killed_mid_job(ray_cluster, local, archive, tmp_path):
    reference, predictor = local
    engine = RayEngine(workers=2)
    killed = []

    def kill_once(done: int, total: int) -> None:
        if done == 1 and not killed:  # a unit is in, others are in flight on both actors
            pids = ray_cluster.get([a.pid.remote() for a in engine.actors])
            ray_cluster.kill(engine.actors[0], no_restart=False)
            killed.append(pids)

    done, _ = predict_archive([archive], predictor.source, tmp_path, engine, progress=kill_once)
    assert killed and len(set(killed[0])) == 2  # two actor processes, one of them killed
    assert ray_cluster.get(engine.actors[0].pid.remote()) not in killed[0]  # it was restarted
    same(done.result, reference)
    assert done.units == 5 and done.resumed == 0
    engine.close()


def test_predict_engine_ray_writes_the_same_worklist_and_parquet(ray_cluster, served_run, archive, tmp_path, capsys):
    model = str(served_run / "export" / "model_int8.tflite")
    common = [archive, "--model", model, "--no-record", "--quiet"]
    assert main(["predict", *common, "--out", str(tmp_path / "local")]) == 0
    assert main(["predict", *common, "--engine", "ray", "--workers", "1", "--out", str(tmp_path / "ray")]) == 0
    out = capsys.readouterr().out
    assert "5 series or image folders, 0 done before" in out
    (local_dir,) = (tmp_path / "local").glob("*-predict")
    (ray_dir,) = (tmp_path / "ray").glob("*-predict")
    for name in (f"{WORKLIST}.csv", "slices.csv"):
        assert (local_dir / name).read_text() == (ray_dir / name).read_text()
    doc = {k: json.loads((d / f"{WORKLIST}.json").read_text()) for k, d in (("local", local_dir), ("ray", ray_dir))}
    assert doc["local"]["worklist"] == doc["ray"]["worklist"] and doc["local"]["slices"] == doc["ray"]["slices"]
    import pyarrow.parquet as pq

    table = pq.read_table(ray_dir / "worklist.parquet").to_pylist()
    rows = list(csv.DictReader((ray_dir / f"{WORKLIST}.csv").open()))
    assert [r["study"] for r in table] == [r["study"] for r in rows]
    assert len(pq.read_table(ray_dir / "slices.parquet")) == 21
    assert len(list((tmp_path / "ray" / PREDICT_PARTS).rglob("*.npz"))) == 5


@pytest.mark.integration  # trains a tiny model on the Ray features
def test_train_features_on_ray_data_match_the_local_ones_and_are_cached(ray_cluster, synthetic12, tmp_path):
    config = TrainConfig(size=32, alpha=0.35, epochs=1)
    ds = read_manifest(synthetic12)
    x = load_inputs(ds, config.preprocessing).x
    weights = resolve_weights(config.alpha, config.size, config.weights)
    model = build_model(config.alpha, config.size, weights, config.neurons, config.dropout, config.seed, config.trim,
                        config.head)
    here = compute_features(model, x)
    engine = RayEngine(workers=2)
    extract = cached(engine.extractor(config), config, tmp_path / "cache")
    there = extract(model, x)
    assert there.shape == here.shape and np.array_equal(there, here)  # the same batches, the same numbers
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 1
    engine.close()
    again = cached(lambda m, images: pytest.fail("computed again"), config, tmp_path / "cache")(model, x)
    assert np.array_equal(again, there)
    run, result = train(config, ds, train_val_test_split(ds, test=0.25, val=0.25), tmp_path / "runs", progress=False,
                        extract=extract)  # the head is fitted here on the cached Ray features
    assert np.array_equal(result.features, there) and RunFolder.open(run).has_metrics


@pytest.mark.integration  # a real Ray cluster
def test_search_trials_on_ray_run_in_parallel_and_the_driver_s_pruner_judges_each_fold(ray_cluster):
    class Folds:
        """A trial whose three folds score its configuration's learning rate, asking after each
        whether to go on (the search's Evaluator is tested in test_tune; here, what travels)."""

        def __call__(self, candidate: Candidate, report) -> Outcome:
            values = []
            for fold in range(3):
                values.append(candidate.config.learning_rate)
                if report(fold, float(np.mean(values))):
                    return Outcome("pruned", float(np.mean(values)), {"folds": fold + 1, "pid": os.getpid()})
            return Outcome("complete", float(np.mean(values)), {"folds": 3, "pid": os.getpid()})

    heard = []

    def judge(number: int):
        def report(fold: int, value: float) -> bool:
            heard.append((number, fold))
            return value < 0.5  # this driver's pruner: stop the poor ones at once
        return report

    jobs = [TuneJob(n, Candidate(TrainConfig(learning_rate=lr), "frozen"), judge(n))
            for n, lr in enumerate((0.9, 0.1, 0.8))]
    executor = RayExecutor(workers=2)
    done = {job.number: outcome for job, outcome in executor.run(Folds(), jobs)}
    executor.close()
    assert sorted(done) == [0, 1, 2] and done[1].state == "pruned" and done[1].attrs["folds"] == 1
    assert done[0].state == done[2].state == "complete" and done[0].value == pytest.approx(0.9)
    assert sorted(heard) == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 2)]
    pids = {o.attrs["pid"] for o in done.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # two actors, not this process
