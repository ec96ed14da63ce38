"""Triage web service: a JSON API and a browser page over one model, loaded once.

`create_app` builds the FastAPI app; `ichedge serve` runs it with uvicorn on 127.0.0.1 unless
told otherwise. Uploads stay in memory (the multipart spool is sized to the request limit) and
are written to disk only when ``keep_uploads`` is set, DICOM then de-identified. File types are
decided by content. Bad input gets a 4xx with a message naming the file; one bad file in a
batch is reported and the others are still scored. ``site`` serves at a site's own thresholds
(``ichedge calibrate``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import keras
import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from ichedge import __version__
from ichedge.data import CT_ICH_CREDIT, DataError
from ichedge.dicom import deidentify
from ichedge.explain import GradCAM, overlay
from ichedge.intake import Prepared, Source, file_kind, prepare_sources
from ichedge.runs import EXPORT_MODELS, ExportFolder, RunFolder, keras_model_file
from ichedge.runtimes import KerasPredictor, LiteRTPredictor, Predictor
from ichedge.triage import triage

# What `serve` runs from a run folder: the Keras model itself, or one of its exported models.
BACKENDS = (*reversed(EXPORT_MODELS), KerasPredictor.kind)  # int8 first: the default
MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_files: int = 256  # a head CT series at 5 mm is 30 to 40 slices; thin slices run to 300
    max_file_bytes: int = 16 * MIB
    max_request_bytes: int = 256 * MIB


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
    """The model, its explainer and the limits; thread-safe inference (LiteRT is not)."""

    def __init__(self, model: str | Path, backend: str = "int8", limits: Limits = Limits(),
                 keep_uploads: Path | None = None, explain: bool = True, site: str | None = None) -> None:
        self.source = resolve_model(model, backend)
        self.predictor = Predictor.load(self.source, site=site)
        if self.predictor.decision is None:
            raise DataError(f"{self.source}: no validated thresholds recorded with this model")
        self.card = _model_card(self.source)
        self.explainer = None
        keras_file = keras_model_file(self.source) if explain or self.source.is_dir() else None
        if explain:
            self.explainer = GradCAM(keras.models.load_model(keras_file))
        file = keras_file if self.source.is_dir() else self.source
        self.info = {"id": hashlib.sha256(file.read_bytes()).hexdigest()[:12], "kind": self.predictor.kind,
                     "name": self.card.get("model", ""), "ichedge_version": __version__,
                     "heatmaps": self.explainer is not None}
        self.limits = limits
        self.keep_uploads = keep_uploads
        self.lock = threading.Lock()

    def run(self, sources: list[Source], study_name: str, heatmaps: bool) -> tuple[Prepared, object]:
        prepared = prepare_sources(sources, self.predictor.preprocessing, image_study=study_name)
        explain = "all" if heatmaps and self.explainer is not None else "none"
        with self.lock:
            # Uploads are single slices or partial studies: slice context (fitted on whole
            # studies) is left to `ichedge predict --context`.
            result = triage(prepared, self.predictor, explain, self.explainer)
        if self.keep_uploads is not None:
            result.errors += self._keep(sources, prepared)
        return prepared, result

    def _keep(self, sources: list[Source], prepared: Prepared) -> list[str]:
        """Usable uploads only, named by content hash; DICOM without identifying fields.

        A file that cannot be kept is reported, never an error of the whole request; a unique
        temporary name per write keeps concurrent uploads of the same file apart.
        """
        problems = []
        self.keep_uploads.mkdir(parents=True, exist_ok=True)
        used = set(prepared.files)
        for src in sources:
            if src.name not in used:
                continue
            try:
                is_dicom = file_kind(src.data) == "dicom"
                data = deidentify(src.data) if is_dicom else src.data
                suffix = ".dcm" if is_dicom else ".png" if data.startswith(b"\x89PNG") else ".jpg"
                target = self.keep_uploads / (hashlib.sha256(src.data).hexdigest()[:20] + suffix)
                handle, tmp = tempfile.mkstemp(dir=self.keep_uploads, suffix=".part")
                with os.fdopen(handle, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            except Exception as exc:  # pydicom and the file system raise many types; scoring already succeeded
                problems.append(f"{src.name}: scored, but not kept ({type(exc).__name__})")
        return problems


async def read_uploads(request: Request, limits: Limits) -> tuple[list[Source], list[dict], str]:
    """Multipart files from a request, in memory; what cannot be used is listed, not raised."""
    length = request.headers.get("content-length")
    if length is None:
        raise HTTPException(411, "send a Content-Length header (chunked uploads are not accepted)")
    if int(length) > limits.max_request_bytes:
        raise HTTPException(413, f"request of {int(length) / MIB:.1f} MiB is over the limit of "
                                 f"{limits.max_request_bytes / MIB:.0f} MiB")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise HTTPException(415, "send the files as multipart/form-data, field name 'files'")
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
        if not data:
            errors.append({"file": name, "error": f"{name}: empty file"})
        elif len(data) > limits.max_file_bytes:
            errors.append({"file": name, "error": f"{name}: larger than {limits.max_file_bytes / MIB:.0f} MiB"})
        else:
            sources.append(Source(name, data))
    study = str(form.get("study") or "uploaded images")[:80]
    return sources, errors, study


def _file_errors(messages: list[str], known: list[dict]) -> list[dict]:
    out = list(known)
    for m in messages:
        out.append({"file": m.split(": ", 1)[0], "error": m})
    return out


def create_app(model: str | Path, backend: str = "int8", limits: Limits = Limits(),
               keep_uploads: Path | None = None, explain: bool = True, site: str | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (a run folder, .tflite or .keras), at ``site``'s thresholds if given."""
    service = TriageService(model, backend, limits, keep_uploads, explain, site)
    # Starlette spools uploads over 1 MiB to a temporary file; within the request limit they stay in memory.
    MultiPartParser.spool_max_size = limits.max_request_bytes
    web = Path(str(resources.files("ichedge") / "web"))
    app = FastAPI(title="ichedge triage", version=__version__, docs_url=None, redoc_url=None,
                  description="Intracranial hemorrhage triage on head CT slices and DICOM studies. "
                              "Research use only; not a medical device.")
    app.state.service = service
    app.mount("/static", StaticFiles(directory=web), name="static")

    def decision_fields() -> dict:
        d = service.predictor.decision
        return {"slice_threshold": d.slice_threshold, "study_threshold": d.study_threshold,
                "study_aggregate": d.study_aggregate, "target_sensitivity": d.target_sensitivity, "site": d.site}

    async def score(request: Request, heatmap: bool):
        sources, errors, study = await read_uploads(request, limits)
        prepared, result = await run_in_threadpool(service.run, sources, study, heatmap)
        errors = _file_errors(result.errors, errors)
        if not result.slices:
            raise HTTPException(422, {"message": "no usable slice in the upload", "errors": errors})
        return prepared, result, errors

    def slice_json(prepared: Prepared, result, k: int) -> dict:
        s, t = result.slices[k], service.predictor.decision.slice_threshold
        heat = None
        if result.explained is not None:
            heat = _png_data_url(overlay(prepared.x[k], result.heatmaps[k], scale=2))
        return {"file": s.file, "study": s.study, "index": s.index, "probability": s.probability,
                "flagged": s.flagged, "threshold": t,
                "decision": "hemorrhage suspected" if s.flagged else "no hemorrhage flagged", "heatmap": heat}

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "model": service.info}

    @app.get("/api/model")
    def model_card() -> dict:
        return {"model": service.info, "decision": decision_fields(), "card": service.card}

    @app.post("/api/predict")
    async def predict(request: Request, heatmap: bool = True) -> dict:
        """Probability, decision and heatmap per uploaded PNG/JPEG slice or DICOM file."""
        prepared, result, errors = await score(request, heatmap)
        return {"model": service.info, **decision_fields(),
                "results": [slice_json(prepared, result, k) for k in range(len(result.slices))], "errors": errors}

    @app.post("/api/studies")
    async def studies(request: Request, heatmap: bool = True) -> dict:
        """Study score, flag and slice ranking per uploaded study (DICOM series, or the images)."""
        prepared, result, errors = await score(request, heatmap)
        slices = [slice_json(prepared, result, k) for k in range(len(result.slices))]
        out = []
        for st in result.studies:
            members = sorted((s for s in slices if s["study"] == st.study), key=lambda s: -s["probability"])
            out.append({**asdict(st), "decision": "hemorrhage suspected" if st.flagged else "no hemorrhage flagged",
                        "ranking": members})
        return {"model": service.info, **decision_fields(), "studies": out, "errors": errors}

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

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    uvicorn.run(create_app(model, **kwargs), host=host, port=port, log_level="warning")
