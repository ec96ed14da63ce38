"""Archive-scale triage on Ray: the same slices, scores and worklist as one process, spread out.

:func:`predict_archive` plans an archive into *units* (a DICOM series, or a folder of images;
:mod:`ichedge.archive`), exactly the groups :func:`ichedge.intake.prepare_sources` makes, in the
order it makes them. On Ray (:class:`RayEngine`) file headers are read and units decoded and
preprocessed by parallel tasks, and scored by a pool of actors that each load the model once
(:class:`Scorer`); the local engine runs the same steps in this process. Training's frozen
features (:meth:`RayEngine.extractor`) and the search's trials (:class:`RayExecutor`) run on the
same cluster. Either way each finished unit is saved as a part, so a
rerun of the same archive and model skips the units already done, and the study stage
(:func:`ichedge.triage.decide`) runs once over every unit's scores, in plan order: the worklist
and scores are those of ``ichedge predict`` bit for bit (LiteRT scores one slice at a time).

Ray is an optional extra (``pip install ichedge[scale]``); without ``address`` a local Ray is
started on this machine. An actor that dies is restarted and its units retried by Ray
(``max_restarts``, ``max_task_retries``); a job that stops anyway resumes from its parts.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ichedge.archive import HEADER_CHUNK, Unit, plan, prepare_unit, read_headers
from ichedge.data import DataError
from ichedge.intake import Prepared, gather_sources
from ichedge.model import build_model, feature_extractor, resolve_weights
from ichedge.runs import PREDICT_PARTS, keras_model_file
from ichedge.runtimes import Predictor
from ichedge.store import model_id
from ichedge.training import TrainConfig
from ichedge.tune import Evaluator, Outcome
from ichedge.tune import Job as TuneJob
from ichedge.triage import Scores, TriageResult, decide, score

ENGINES = ("local", "ray")
FEATURE_BATCH = 64  # images per backbone call, as ichedge.training.compute_features


def score_unit(item: tuple[Prepared, list[str]], predictor: Predictor) -> Scores:
    prepared, digests = item
    scores = score(prepared, predictor)
    scores.digests = digests
    return scores


@dataclass
class Job:
    """An archive, a model and where the parts of its finished units are kept."""

    paths: list[str]
    model: Path
    site: str | None
    parts: Path

    @classmethod
    def of(cls, paths: Sequence[str | Path], model: str | Path, out: Path, site: str | None) -> Job:
        """Parts are kept per archive, model (by content: a retrained model starts afresh) and site."""
        model = Path(model).resolve()
        file = model if model.is_file() else keras_model_file(model)
        key = hashlib.sha256("\n".join([model_id(file), site or "", *sorted(str(Path(p).resolve()) for p in paths)])
                             .encode()).hexdigest()[:16]
        return cls([str(p) for p in paths], model, site, out / PREDICT_PARTS / key)

    def part(self, unit: Unit) -> Path:
        return self.parts / f"{unit.key}.npz"

    def done(self, unit: Unit) -> Scores | None:
        path = self.part(unit)
        if not path.is_file():
            return None
        with np.load(path) as d:
            return Scores(d["files"].tolist(), d["studies"].tolist(), d["indices"].tolist(), d["network"], d["ood"],
                          d["errors"].tolist(), d["digests"].tolist())

    def save(self, unit: Unit, s: Scores) -> None:
        """Written whole under a temporary name, then renamed: a part is complete or absent."""
        self.parts.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.parts, suffix=".part")
        with os.fdopen(handle, "wb") as fh:
            np.savez(fh, files=np.array(s.files, dtype=str), studies=np.array(s.studies, dtype=str),
                     indices=np.array(s.indices, dtype=np.int64), network=s.network, ood=s.ood,
                     errors=np.array(s.errors, dtype=str), digests=np.array(s.digests, dtype=str))
        os.replace(tmp, self.part(unit))


@dataclass
class Archive:
    """What a job found and scored: the triage result and how much was done now."""

    result: TriageResult
    digests: dict[str, str]  # file name -> SHA-256 of each scored slice
    units: int
    resumed: int  # units whose part was there before this run
    files: int


class Engine(ABC):
    """Runs the steps of :func:`predict_archive`: reading headers, and preparing and scoring units."""

    @abstractmethod
    def headers(self, names: list[str]) -> list[tuple[str, str, object]]: ...

    @abstractmethod
    def scores(self, units: list[Unit], predictor: Predictor, job: Job) -> Iterator[tuple[Unit, Scores]]:
        """Each unit with its scores by ``predictor`` (or a copy loaded from ``job.model`` where the
        work runs), in any order, as they finish."""

    def close(self) -> None:
        """Release what the engine started."""


class LocalEngine(Engine):
    """This process, one unit after another: the twin every other engine must match."""

    def headers(self, names: list[str]) -> list[tuple[str, str, object]]:
        return read_headers(names)

    def scores(self, units: list[Unit], predictor: Predictor, job: Job) -> Iterator[tuple[Unit, Scores]]:
        for unit in units:
            yield unit, score_unit(prepare_unit(unit, predictor.preprocessing), predictor)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict_archive(paths: Sequence[str | Path], model: str | Path, out: Path, engine: Engine | None = None,
                    site: str | None = None, context: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> tuple[Archive, Predictor]:
    """Triage every file under ``paths``; finished units are kept under ``out`` and skipped on a rerun.

    ``progress(done, total)`` is called as units finish. Returns the result and the predictor
    (its thresholds and preprocessing) for :func:`ichedge.triage.write_triage`.
    """
    engine = engine or LocalEngine()
    predictor = Predictor.load(model, site=site)
    if predictor.decision is None:
        raise DataError(f"{model}: no validated thresholds recorded with this model")
    sources, missing = gather_sources(paths)
    headers = engine.headers([s.name for s in sources])
    units, errors = plan(headers)
    job = Job.of(paths, model, out, site)
    found: dict[Unit, Scores] = {}
    for unit in units:
        if (s := job.done(unit)) is not None:
            found[unit] = s
    resumed = len(found)
    todo = [u for u in units if u not in found]
    if progress:
        progress(len(found), len(units))
    for unit, s in engine.scores(todo, predictor, job):
        job.save(unit, s)
        found[unit] = s
        if progress:
            progress(len(found), len(units))
    scores = Scores.concat([found[u] for u in units])
    scores.errors[:0] = missing + errors
    return Archive(decide(scores, predictor, context), dict(zip(scores.files, scores.digests)), len(units), resumed,
                   len(sources) + len(missing)), predictor


class Scorer:
    """A Ray actor's state: the model, loaded once, scoring one prepared unit per call."""

    def __init__(self, model: str, site: str | None) -> None:
        self.predictor = Predictor.load(model, site=site)

    def score(self, item: tuple[Prepared, list[str]]) -> Scores:
        return score_unit(item, self.predictor)

    def pid(self) -> int:
        return os.getpid()


class FeatureExtractor:
    """A Ray Data actor: the frozen model of a training configuration, built once (as
    :func:`ichedge.training.fit` builds it), pooling the features of each batch of images."""

    def __init__(self, config: dict) -> None:
        c = TrainConfig(**config)
        weights = resolve_weights(c.alpha, c.size, c.weights)
        model = build_model(c.alpha, c.size, weights, c.neurons, c.dropout, c.seed, c.trim, c.head)
        self.extract = feature_extractor(model)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"features": self.extract.predict(batch["data"].astype("float32"), batch_size=FEATURE_BATCH,
                                                 verbose=0)}


def cached(extract: Callable[[object, np.ndarray], np.ndarray], config: TrainConfig, folder: Path
           ) -> Callable[[object, np.ndarray], np.ndarray]:
    """``extract`` behind a cache of features by configuration and input pixels (``folder/<key>.npy``):
    a second training, fold or resumed job on the same images reads them back."""
    def run(model, x: np.ndarray) -> np.ndarray:
        h = hashlib.sha256(repr([config.alpha, config.size, config.weights, config.trim, config.head, x.shape,
                                 str(x.dtype)]).encode())
        h.update(np.ascontiguousarray(x).data)
        path = folder / f"features-{h.hexdigest()[:24]}.npy"
        if path.is_file():
            return np.load(path)
        features = extract(model, x)
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
        with os.fdopen(handle, "wb") as fh:
            np.save(fh, features)
        os.replace(tmp, path)
        return features

    return run


class RayEngine(Engine):
    """Ray tasks read headers and prepare units; ``workers`` :class:`Scorer` actors score them.

    ``address`` joins a running cluster ('auto', or HOST:PORT); without it a local Ray starts on
    this machine with two logical CPUs per worker, one for its actor and one for a task preparing
    the next unit, so decoding and inference overlap. At most two units per worker are in
    flight, which bounds the object store; each goes to the actor with the fewest waiting.
    """

    def __init__(self, workers: int = 2, address: str | None = None) -> None:
        try:
            import ray  # an optional extra: ichedge[scale]
        except ImportError:
            raise DataError("the Ray engine needs Ray: pip install 'ichedge[scale]'") from None
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.ray, self.workers, self.actors = ray, workers, []
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, num_cpus=None if address else 2 * workers, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self._read = ray.remote(num_cpus=1)(read_headers)
        self._prepare = ray.remote(num_cpus=1)(prepare_unit)
        self._actor = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(Scorer)

    def headers(self, names: list[str]) -> list[tuple[str, str, object]]:
        refs = [self._read.remote(list(chunk)) for chunk in _chunks(names, HEADER_CHUNK)]
        return [h for part in self.ray.get(refs) for h in part]

    def scores(self, units: list[Unit], predictor: Predictor, job: Job) -> Iterator[tuple[Unit, Scores]]:
        if not units:
            return
        ray, pre = self.ray, predictor.preprocessing
        self.actors = [self._actor.remote(str(job.model), job.site) for _ in range(self.workers)]
        queue, pending, load = list(units), {}, [0] * self.workers
        while queue or pending:
            while queue and len(pending) < 2 * self.workers:
                unit, k = queue.pop(0), load.index(min(load))
                pending[self.actors[k].score.remote(self._prepare.remote(unit, pre))] = (unit, k)
                load[k] += 1
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            unit, k = pending.pop(ref)
            load[k] -= 1
            yield unit, ray.get(ref)

    def extractor(self, config: TrainConfig) -> Callable[[object, np.ndarray], np.ndarray]:
        """``extract(model, x)`` for :func:`ichedge.training.train`: the frozen features of ``x`` by
        Ray Data, in order, over ``workers`` :class:`FeatureExtractor` actors (``model`` is rebuilt
        from ``config`` in each; the driver's copy stays here)."""
        ray = self.ray

        def extract(model, x: np.ndarray) -> np.ndarray:
            ray.data.DataContext.get_current().execution_options.preserve_order = True
            # blocks of whole batches, several per worker: every actor works, and each batch holds
            # the images compute_features would batch together
            per_block = FEATURE_BATCH * max(1, -(-len(x) // (FEATURE_BATCH * 4 * self.workers)))
            blocks = ray.data.from_numpy([x[k:k + per_block] for k in range(0, len(x), per_block)]).map_batches(
                FeatureExtractor, fn_constructor_kwargs={"config": config.to_json()}, batch_size=FEATURE_BATCH,
                concurrency=self.workers, num_cpus=1)
            return np.concatenate([b["features"] for b in blocks.iter_batches(batch_size=None, batch_format="numpy")])

        return extract

    def close(self) -> None:
        """End the actors, and the local Ray this engine started."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()


class TrialRunner:
    """A Ray actor's state for the search: its own :class:`ichedge.tune.Evaluator` (and caches),
    running one trial per call and asking the driver, fold by fold, whether to go on."""

    def __init__(self, evaluate: Evaluator) -> None:
        self.evaluate = evaluate

    def run(self, number: int, candidate, requests, answer) -> Outcome:
        def report(fold: int, value: float) -> bool:
            requests.put((number, fold, value))
            return answer.get()  # the driver's pruner decides, as for a trial run here

        return self.evaluate(candidate, report)


class RayExecutor:
    """`ichedge tune` trials on Ray: ``workers`` actors run one trial each at a time (:class:`TrialRunner`).

    Each fold's result travels to the driver by a Ray queue, where the study's pruner judges it as
    it judges a local trial, and the answer travels back; TPE proposes ``workers`` candidates at
    once (its constant liar keeps them apart). ``address`` as for :class:`RayEngine`.
    """

    def __init__(self, workers: int = 2, address: str | None = None) -> None:
        self.engine = RayEngine(workers, address)
        self.slots = workers
        self.runners: list = []

    def run(self, evaluate: Evaluator, jobs: Sequence[TuneJob]) -> Iterator[tuple[TuneJob, Outcome]]:
        ray = self.engine.ray
        from ray.util.queue import Queue  # of the optional extra, as ray itself

        if not self.runners:
            shared = ray.put(evaluate)
            self.runners = [ray.remote(num_cpus=1)(TrialRunner).remote(shared) for _ in range(self.slots)]
        requests, waiting, free = Queue(), list(jobs), list(self.runners)
        answers = {job.number: Queue() for job in jobs}
        by_number = {job.number: job for job in jobs}
        running: dict = {}
        while waiting or running:
            while waiting and free:
                job, runner = waiting.pop(0), free.pop(0)
                running[runner.run.remote(job.number, job.candidate, requests, answers[job.number])] = job, runner
            while not requests.empty():
                number, fold, value = requests.get()
                answers[number].put(by_number[number].report(fold, value))
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            for ref in ready:
                job, runner = running.pop(ref)
                free.append(runner)
                yield job, ray.get(ref)

    def close(self) -> None:
        for runner in self.runners:
            self.engine.ray.kill(runner)
        self.runners = []
        self.engine.close()
