"""Triage web service: a JSON API and a browser page over one model, loaded once.

`create_app` builds the FastAPI app; `ichedge serve` runs it on 127.0.0.1 unless told otherwise.
Uploads stay in memory and are written to disk only when ``keep_uploads`` is set, DICOM then
de-identified to the DICOM Basic Profile and images stripped of metadata. File types are
decided by content, and what a file decodes to is bounded from its header. Every slice passes
the quality gate and gets an input OOD score. Bad input gets a 4xx with a message naming the
file; one bad file in a batch is reported and the others are still scored.

With a :class:`~ichedge.store.Store`, every scoring request is recorded there (it is the audit
log: who, when, status, latency) with each study's and slice's decision by content hash;
readers confirm or reject decisions, mark bleeds and subtypes (``/api/feedback``), see a
study's record (``/api/history/...``), and the monitor (``/api/monitor``, ``/monitor``) shows
volume, drift and agreement by week (:mod:`ichedge.monitoring`).

Cost is bounded per request (:class:`Limits`): a few requests are read and scored at once, a
few more wait, the rest get 503 with Retry-After; inference takes turns of a few slices, first
come first served, so a one-slice request is never stuck behind a 64-slice one. Access
(tokens, allowed hosts, same origin, security headers, the audit log) is :mod:`ichedge.access`;
timeouts are :mod:`ichedge.connections`. ``site`` serves at a site's own thresholds.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import html
import io
import json
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import keras
import numpy as np
from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.formparsers import MultiPartParser
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ichedge import __version__
from ichedge.access import SameOrigin, SecurityHeaders, TokenStore, allowed_hosts, bearer_auth, deid_key
from ichedge.connections import Timeouts, run
from ichedge.data import CT_ICH_CREDIT, DataError, DecodeLimits
from ichedge.deid import DeidentificationError, deidentify_dicom, strip_image_metadata
from ichedge.explain import GradCAM, overlay
from ichedge.intake import Prepared, Source, file_kind, prepare_sources
from ichedge.monitoring import monitor
from ichedge.runs import EXPORT_MODELS, ExportFolder, RunFolder, keras_model_file, validation_scores
from ichedge.runtimes import KerasPredictor, LiteRTPredictor, Predictor
from ichedge.store import STUDY_HASH, SUBTYPES, VERDICTS, FeedbackError, Store, model_id
from ichedge.triage import OUTSIDE, SLICE_HASH_CHARS, TriageResult, study_records, triage

# What `serve` runs from a run folder: the Keras model itself, or one of its exported models.
BACKENDS = (*reversed(EXPORT_MODELS), KerasPredictor.kind)  # int8 first: the default
MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may carry, and how many are served at once (docs/service.md, "Limits")."""

    max_files: int = 256  # a head CT series at 5 mm is 30 to 40 slices; thin slices run to 300
    max_file_bytes: int = 16 * MIB
    max_request_bytes: int = 128 * MIB  # 256 uncompressed 512x512 CT slices
    decode: DecodeLimits = DecodeLimits()
    max_active: int = 2  # requests being read, decoded and scored at once
    max_waiting: int = 8  # requests waiting for one of those; more are told to retry
    retry_after_s: int = 5
    turn: int = 8  # slices per inference turn: what a newly arrived request waits for at most


VIEWS = ("brain", "subdural", "bone")  # the viewer's window presets, where a slice has HU


@dataclass(frozen=True)
class Access:
    """Who may use the service (:mod:`ichedge.access`); what is recorded is the store's.

    The defaults suit loopback: no tokens, the loopback host names. ``ichedge serve`` refuses to
    listen beyond loopback without tokens and TLS (:func:`ichedge.access.check_exposure`).
    """

    tokens: Path | None = None  # bearer tokens required when set (ichedge token create)
    deid_key: Path | None = None  # keys the UIDs of kept DICOM (ichedge.access.deid_key); None: unkeyed hash
    allowed_hosts: tuple[str, ...] = tuple(allowed_hosts("127.0.0.1"))
    tls: bool = False


class Busy(Exception):
    """Every slot is taken and the waiting line is full."""


class Admission:
    """At most ``active`` requests at work and ``waiting`` in line; the rest are refused at once.

    A request is admitted before its body is read, so the bodies of waiting requests are not
    in memory.
    """

    def __init__(self, active: int, waiting: int) -> None:
        self.slots = asyncio.Semaphore(active)
        self.waiting, self.max_waiting = 0, waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.slots.locked():
            if self.waiting >= self.max_waiting:
                raise Busy
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self.slots.acquire()
        try:
            yield
        finally:
            self.slots.release()


class Turns:
    """Runs models on batches in turns of ``size`` inputs, first come first served.

    LiteRT interpreters and the Grad-CAM model are not thread-safe, so one turn runs at a time;
    a request queues again after each of its turns, so a request that arrives during a long
    one waits for one turn, not for the whole of it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.ready = threading.Condition()
        self.queue: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        ticket = object()
        with self.ready:
            self.queue.append(ticket)
            self.ready.wait_for(lambda: self.queue[0] is ticket)
        try:
            yield
        finally:
            with self.ready:
                self.queue.popleft()
                self.ready.notify_all()

    def __call__(self, model: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, max(len(x), 1), self.size):
            with self._turn():
                out.append(model(x[start:start + self.size]))
        return np.concatenate(out)


def resolve_model(path: str | Path, backend: str = "int8") -> Path:
    """The model file to serve: a .tflite/.keras as given, or from a run folder its latest export."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: model not found")
    if not path.is_dir():
        return path
    if backend == KerasPredictor.kind:
        return path
    return RunFolder.open(path).latest_export().model_file(backend)


def _model_card(source: Path) -> dict:
    """The exported model card, or for a Keras run what its config records."""
    export = ExportFolder.of_model(source)
    if source.suffix == LiteRTPredictor.suffix and export.has_card:
        return export.card()
    meta = RunFolder.open(source if source.is_dir() else source.parent).meta
    return {"model": f"MobileNetV2 alpha {meta['config']['alpha']:g}, {meta['config']['size']}x{meta['config']['size']}",
            "preprocessing": meta["preprocessing"], "weights": meta["weights"],
            "training": {"config": meta["config"], "dataset": meta["dataset"]["summary"]},
            "data_credit": meta["dataset"].get("credit", ""),
            "intended_use": "research on edge triage of head CT; not a medical device, not for diagnosis"}


def _png_data_url(picture: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class TriageService:
    """The model, its explainer and the limits; inference in turns (LiteRT is not thread-safe)."""

    def __init__(self, model: str | Path, backend: str = "int8", limits: Limits = Limits(),
                 keep_uploads: Path | None = None, explain: bool = True, site: str | None = None,
                 deid_key: bytes | None = None) -> None:
        self.source = resolve_model(model, backend)
        self.predictor = Predictor.load(self.source, site=site)
        if self.predictor.decision is None:
            raise DataError(f"{self.source}: no validated thresholds recorded with this model")
        self.card = _model_card(self.source)
        self.explainer = None
        keras_file = keras_model_file(self.source) if explain or self.source.is_dir() else None
        if explain:
            self.explainer = GradCAM(keras.models.load_model(keras_file))
        self.file = keras_file if self.source.is_dir() else self.source
        self.info = {"id": model_id(self.file), "kind": self.predictor.kind,
                     "name": self.card.get("model", ""), "ichedge_version": __version__,
                     "heatmaps": self.explainer is not None}
        self.limits = limits
        self.keep_uploads = keep_uploads
        self.deid_key = deid_key
        self.turns = Turns(limits.turn)

    def run(self, sources: list[Source], study_name: str, heatmaps: bool, views: bool = False
            ) -> tuple[Prepared, TriageResult, dict[str, str]]:
        """Score the uploads; also the names of the kept copies, by upload name."""
        prepared = prepare_sources(sources, self.predictor.preprocessing, image_study=study_name,
                                   limits=self.limits.decode, views=VIEWS if views else ())
        explain = "all" if heatmaps and self.explainer is not None else "none"
        # Uploads are single slices or partial studies: slice context (fitted on whole studies)
        # is left to `ichedge predict --context`.
        result = triage(prepared, self.predictor, explain, self.explainer, run=self.turns)
        kept: dict[str, str] = {}
        if self.keep_uploads is not None:
            result.errors += self._keep(sources, prepared, kept)
        return prepared, result, kept

    def _keep(self, sources: list[Source], prepared: Prepared, kept: dict[str, str]) -> list[str]:
        """Usable uploads only, named by content hash: DICOM de-identified, images re-encoded bare.

        Fills ``kept`` (upload name -> kept file name). A file that cannot be kept is reported,
        never an error of the whole request; a unique temporary name per write keeps concurrent
        uploads of the same file apart.
        """
        problems = []
        self.keep_uploads.mkdir(parents=True, exist_ok=True)
        used = set(prepared.files)
        for src in sources:
            if src.name not in used:
                continue
            try:
                is_dicom = file_kind(src.data) == "dicom"
                if is_dicom:
                    data = deidentify_dicom(src.data, self.deid_key)
                else:
                    data = strip_image_metadata(src.data, self.limits.decode.max_pixels)
                name = src.digest[:SLICE_HASH_CHARS] + (".dcm" if is_dicom else ".png")
                target = self.keep_uploads / name
                handle, tmp = tempfile.mkstemp(dir=self.keep_uploads, suffix=".part")
                with os.fdopen(handle, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
                kept[src.name] = name
            except DeidentificationError as exc:
                problems.append(f"{src.name}: scored, but not kept ({exc})")
            except Exception as exc:  # pydicom and the file system raise many types; scoring already succeeded
                problems.append(f"{src.name}: scored, but not kept ({type(exc).__name__})")
        return problems


def check_request(request: Request, limits: Limits) -> None:
    """What the headers alone can refuse, before the request waits for a slot or sends its body."""
    length = request.headers.get("content-length")
    if length is None:
        raise HTTPException(411, "send a Content-Length header (chunked uploads are not accepted)")
    if not length.isdigit():
        raise HTTPException(400, "Content-Length is not a number")
    if int(length) > limits.max_request_bytes:
        raise HTTPException(413, f"request of {int(length) / MIB:.1f} MiB is over the limit of "
                                 f"{limits.max_request_bytes / MIB:.0f} MiB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send the files as multipart/form-data, field name 'files'")


async def read_uploads(request: Request, limits: Limits) -> tuple[list[Source], list[dict], str]:
    """Multipart files from a request, in memory; what cannot be used is listed, not raised."""
    form = await request.form(max_files=limits.max_files, max_fields=16)
    uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not uploads:
        raise HTTPException(400, "no files uploaded (multipart field 'files')")
    sources, errors, seen = [], [], set()
    for upload in uploads:
        name = Path(upload.filename or "upload").name or "upload"
        base, n = name, 1
        while name in seen:  # two uploads of the same name stay apart in the results
            n += 1
            name = f"{base} ({n})"
        seen.add(name)
        data = await upload.read(limits.max_file_bytes + 1)
        await upload.close()  # the spooled copy goes now, not with the request: one copy in memory
        if not data:
            errors.append({"file": name, "error": f"{name}: empty file"})
        elif len(data) > limits.max_file_bytes:
            errors.append({"file": name, "error": f"{name}: larger than {limits.max_file_bytes / MIB:.0f} MiB"})
        else:
            sources.append(Source(name, data))
    study = str(form.get("study") or "uploaded images")[:80]
    return sources, errors, study


def decision_text(flagged: bool, outside: bool) -> str:
    """What the page shows: a result outside the model's validated inputs is never plain reassurance."""
    text = "hemorrhage suspected" if flagged else "no hemorrhage flagged"
    return f"{text}; {OUTSIDE}: read it yourself" if outside else text


def _file_errors(messages: list[str], known: list[dict]) -> list[dict]:
    out = list(known)
    for m in messages:
        out.append({"file": m.split(": ", 1)[0], "error": m})
    return out


class FeedbackIn(BaseModel):
    """A reader's verdict on a study decision (``slice`` null) or a slice decision; see :meth:`Store.add_feedback`."""

    prediction: int
    slice: str | None = Field(None, pattern=f"^{STUDY_HASH.pattern}$")
    verdict: Literal[VERDICTS] | None = None
    subtype: Literal[SUBTYPES] | None = None
    point: dict[Literal["x", "y"], float] | None = None


def create_app(model: str | Path, backend: str = "int8", limits: Limits = Limits(),
               keep_uploads: Path | None = None, explain: bool = True, site: str | None = None,
               access: Access = Access(), store: Store | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (a run folder, .tflite or .keras), at ``site``'s thresholds if given.

    With ``store``, requests and decisions are recorded there and feedback is taken.
    """
    key = deid_key(access.deid_key) if keep_uploads is not None and access.deid_key is not None else None
    service = TriageService(model, backend, limits, keep_uploads, explain, site, key)
    auth = Depends(bearer_auth(TokenStore(access.tokens) if access.tokens is not None else None))
    d = service.predictor.decision
    if store is not None:
        store.register_model(service.info["id"], service.info["name"] or service.source.name, service.predictor.kind,
                             str(service.source), d.slice_threshold, d.study_threshold,
                             validation_scores(service.source))
    # Starlette spools uploads over 1 MiB to a temporary file; within the request limit they stay in memory.
    MultiPartParser.spool_max_size = limits.max_request_bytes
    web = Path(str(resources.files("ichedge") / "web"))
    app = FastAPI(title="ichedge triage", version=__version__, docs_url=None, redoc_url=None,
                  description="Intracranial hemorrhage triage on head CT slices and DICOM studies. "
                              "Research use only; not a medical device.")
    app.state.service = service
    app.mount("/static", StaticFiles(directory=web), name="static")
    # Added last is outermost: headers on every answer, then the Host check, then the Origin check.
    app.add_middleware(SameOrigin)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(access.allowed_hosts))
    app.add_middleware(SecurityHeaders, tls=access.tls)

    def decision_fields() -> dict:
        return {"slice_threshold": d.slice_threshold, "study_threshold": d.study_threshold,
                "study_aggregate": d.study_aggregate, "target_sensitivity": d.target_sensitivity, "site": d.site}

    def need_store() -> Store:
        if store is None:
            raise HTTPException(404, "this service keeps no record (started without a database)")
        return store

    admission = Admission(limits.max_active, limits.max_waiting)

    async def score(request: Request, heatmap: bool, views: bool = False):
        """Admit, read and score a request; record it (the audit record) whatever its outcome.

        The returned ``ids`` (prediction id by study hash) is filled by the ``finally`` block,
        which runs before the caller reads it: the record is written before the answer is sent.
        """
        started, record, ids = time.perf_counter(), {"status": 500}, {}
        try:
            check_request(request, limits)
            try:
                async with admission.slot():
                    sources, errors, study = await read_uploads(request, limits)
                    prepared, result, kept = await run_in_threadpool(service.run, sources, study, heatmap, views)
            except Busy:
                raise HTTPException(503, f"busy: {limits.max_active} requests are being scored and "
                                         f"{limits.max_waiting} are waiting; retry later",
                                    headers={"Retry-After": str(limits.retry_after_s)}) from None
            digests = {src.name: src.digest for src in sources}
            studies = study_records(result, digests, kept)
            record.update(n_files=len(sources) + len(errors), studies=studies)
            errors = _file_errors(result.errors, errors)
            if not result.slices:
                raise HTTPException(422, {"message": "no usable slice in the upload", "errors": errors})
            record["status"] = 200
            return prepared, result, errors, studies, ids
        except HTTPException as exc:
            record["status"] = exc.status_code
            raise
        except ClientDisconnect:
            record["status"] = 499  # nginx's "client closed request": no answer was sent
            raise
        finally:
            if store is not None:
                studies = record.pop("studies", {})
                client = request.client.host if request.client else None
                ids.update(await run_in_threadpool(
                    store.record, channel="serve", reader=request.state.token_name, client=client,
                    method=request.method, path=request.url.path, model=service.info["id"],
                    latency_ms=1000 * (time.perf_counter() - started), studies=studies.values(),
                    slice_threshold=d.slice_threshold, study_threshold=d.study_threshold, site=d.site, **record))

    def slice_json(prepared: Prepared, result, k: int, slice_hash: str) -> dict:
        s, t = result.slices[k], d.slice_threshold
        heat = None
        if result.explained is not None:
            heat = _png_data_url(overlay(prepared.x[k], result.heatmaps[k], scale=2))
        out = {"file": s.file, "study": s.study, "index": s.index, "slice_hash": slice_hash,
               "probability": s.probability, "flagged": s.flagged, "threshold": t,
               "decision": decision_text(s.flagged, s.outside), "ood_score": s.ood_score, "outside": s.outside,
               "heatmap": heat}
        if prepared.views:
            out["views"] = {name: _png_data_url(v) for name, v in prepared.views[k].items()}
        return out

    def hashes(result, studies) -> list[str]:
        """Each slice's content hash, in ``result.slices`` order."""
        by_position = {(st, s.position): s.slice_hash for st, rec in studies.items() for s in rec.slices}
        return [by_position[(s.study, s.index)] for s in result.slices]

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "model": service.info}

    @app.head("/api/health", include_in_schema=False)  # uptime monitors ask with HEAD
    def health_head() -> dict:
        return health()

    @app.get("/api/model", dependencies=[auth])
    def model_card() -> dict:
        return {"model": service.info, "decision": decision_fields(), "card": service.card,
                "recorded": store is not None}

    @app.post("/api/predict", dependencies=[auth])
    async def predict(request: Request, heatmap: bool = True) -> dict:
        """Probability, decision and heatmap per uploaded PNG/JPEG slice or DICOM file."""
        prepared, result, errors, studies, _ = await score(request, heatmap)
        h = hashes(result, studies)
        return {"model": service.info, **decision_fields(),
                "results": [slice_json(prepared, result, k, h[k]) for k in range(len(result.slices))],
                "errors": errors, "notes": result.notes, "recorded": store is not None}

    @app.post("/api/studies", dependencies=[auth])
    async def studies_endpoint(request: Request, heatmap: bool = True, views: bool = False) -> dict:
        """Study score, flag and slice ranking per uploaded study (DICOM series, or the images);
        ``views`` adds each slice's window presets for a viewer."""
        prepared, result, errors, studies, ids = await score(request, heatmap, views)
        h = hashes(result, studies)
        slices = [slice_json(prepared, result, k, h[k]) for k in range(len(result.slices))]
        out = []
        for st in result.studies:
            members = sorted((s for s in slices if s["study"] == st.study), key=lambda s: -s["probability"])
            sid = studies[st.study].study
            out.append({**asdict(st), "id": sid, "prediction": ids.get(sid),
                        "decision": decision_text(st.flagged, st.outside_slices > 0), "ranking": members})
        return {"model": service.info, **decision_fields(), "studies": out, "errors": errors, "notes": result.notes,
                "recorded": store is not None}

    @app.post("/api/feedback", dependencies=[auth])
    async def add_feedback(request: Request, body: FeedbackIn = Body(...)) -> dict:
        """A reader confirms or rejects a study or slice decision, or marks a bleed and its subtype."""
        db = need_store()
        point = None if body.point is None else (body.point.get("x", -1.0), body.point.get("y", -1.0))
        try:
            done = await run_in_threadpool(db.add_feedback, body.prediction, verdict=body.verdict,
                                           slice_hash=body.slice, subtype=body.subtype, point=point,
                                           reader=request.state.token_name)
        except FeedbackError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"feedback": done}

    @app.get("/api/history/{study}", dependencies=[auth])
    async def history(study: str) -> dict:
        """The model's earlier decisions on a study and readers' feedback, newest first."""
        db = need_store()
        if not STUDY_HASH.fullmatch(study):
            raise HTTPException(422, "a study is named by its hex content hash")
        return await run_in_threadpool(db.history, study)

    @app.get("/api/monitor", dependencies=[auth])
    async def monitor_report(model: str | None = None) -> dict:
        """Weekly volume, flag rates, drift (PSI), OOD rate and reader agreement of the served model."""
        return await run_in_threadpool(monitor, need_store(), model or service.info["id"])

    @app.get("/model-card", response_class=HTMLResponse)
    def model_card_page() -> str:
        md = ExportFolder.of_model(service.source).card_markdown
        text = md.read_text() if md.is_file() else json.dumps(service.card, indent=2)
        return (f"<!doctype html><meta charset=utf-8><title>Model card</title>"
                f"<link rel=stylesheet href=/static/style.css><main><a href=/>&larr; back</a>"
                f"<pre class=card>{html.escape(text)}</pre></main>")

    @app.get("/api/credit")
    def credit() -> dict:
        return {"data": service.card.get("data_credit") or CT_ICH_CREDIT}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(web / "index.html")

    @app.get("/monitor", include_in_schema=False)
    def monitor_page() -> FileResponse:
        return FileResponse(web / "monitor.html")

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, *, certfile: str | None = None,
          keyfile: str | None = None, timeouts: Timeouts = Timeouts(), **kwargs) -> None:
    """Serve until interrupted, with the connection timeouts and TLS of :func:`ichedge.connections.run`."""
    run(create_app(model, **kwargs), host, port, certfile=certfile, keyfile=keyfile, timeouts=timeouts)
