"""One way to get probabilities from any trained model, and from files to a triage worklist.

:class:`Predictor` takes uint8 model inputs (as :mod:`ichedge.preprocess` makes them) and returns
the probability of hemorrhage per image, whatever runs underneath; evaluation, profiling and
later the service talk only to it. A model never travels without its preprocessing: a run
folder has it in ``config.json``, an exported ``.tflite`` in the ``model_card.json`` beside it,
with the thresholds the model was validated at (:class:`Decision`).

:func:`prepare_sources` and :func:`triage` take PNG/JPEG slices and DICOM series to per-slice
probabilities, study scores and an urgency-ordered worklist, with Grad-CAM heatmaps on request.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ichedge.context import SliceContext
from ichedge.data import DataError, read_dataset, read_image
from ichedge.dicom import WINDOWS, CTSlice, is_dicom, order_series, read_ct_slice, window, windowed
from ichedge.preprocess import Loaded, Preprocessing, load_inputs, patient_groups, prepare_slice, slice_order
from ichedge.triage import SliceResult, StudyResult, build_worklist, study_decision, write_worklist

log = logging.getLogger(__name__)


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run folder (no config.json)")
    return json.loads(path.read_text())


def preprocessing_of(meta: dict) -> Preprocessing:
    p = meta["preprocessing"]
    return Preprocessing(size=p["size"], channels=p["channels"], crop=p["crop"])


def split_part(meta: dict, part: str) -> tuple[Loaded, np.ndarray | None, np.ndarray | None]:
    """Reload the images of one part (train/val/test) of the split a run was trained on, the
    patient of each (None without patient IDs) and its slice number (None where unknown)."""
    info = meta["dataset"]
    ds = read_dataset(info["source"], tuple(info["windows"]))
    position = {r.key: i for i, r in enumerate(ds.records)}
    wanted = meta["split"][part]
    missing = [k for k in wanted if k not in position]
    if missing:
        raise DataError(f"{info['source']}: {len(missing)} image(s) of the run's {part} split are gone, e.g. {missing[0]}")
    loaded = load_inputs(ds, preprocessing_of(meta), [position[k] for k in wanted])
    return loaded, patient_groups(ds, loaded), slice_order(ds, loaded)


def split_inputs(meta: dict, part: str) -> Loaded:
    return split_part(meta, part)[0]


@dataclass(frozen=True)
class ContextDecision:
    """A slice-context model (:mod:`ichedge.context`) and the thresholds validated on its scores."""

    model: SliceContext
    slice_threshold: float
    study_threshold: float

    def to_card(self) -> dict:
        """As a model card's ``thresholds.context`` holds it."""
        return {"model": self.model.to_json(), "high_sensitivity": self.slice_threshold, "study": self.study_threshold}


@dataclass(frozen=True)
class Decision:
    """The thresholds a model was validated with: slices, and studies by an aggregate of slices;
    and, for a run trained with slice context, the context model with its own thresholds."""

    slice_threshold: float
    study_threshold: float
    study_aggregate: str
    target_sensitivity: float
    context: ContextDecision | None = None

    @staticmethod
    def from_thresholds(t: dict, runtime: str | None = None) -> Decision:
        """From a model card's ``thresholds``: those chosen on this runtime's own validation
        outputs where the card has them (int8 arithmetic moves probabilities), else the Keras
        model's. Cards made before study metrics flag a study when any slice is flagged."""
        own = t.get("by_runtime", {}).get(runtime or "")
        if runtime and own is None:
            log.warning("no thresholds validated on %s outputs in this model card; using the Keras model's", runtime)
        chosen = own or t
        context = None
        if "context" in t:
            if own is not None and "context" not in own:
                log.warning("no slice-context thresholds validated on %s outputs in this model card; "
                            "using the Keras model's", runtime)
            c = chosen.get("context", t["context"])
            context = ContextDecision(SliceContext.from_json(t["context"]["model"]), float(c["high_sensitivity"]),
                                      float(c["study"]))
        return Decision(float(chosen["high_sensitivity"]), float(chosen.get("study", chosen["high_sensitivity"])),
                        t.get("study_aggregate", "max"), float(t["high_sensitivity_target"]), context)

    @staticmethod
    def of_run(run_dir: Path) -> Decision:
        return Decision.from_thresholds(run_thresholds(run_dir))

    def to_json(self) -> dict:
        out = {"slice_threshold": self.slice_threshold, "study_threshold": self.study_threshold,
               "study_aggregate": self.study_aggregate, "target_sensitivity": self.target_sensitivity}
        if self.context is not None:
            out["context"] = {"slice_threshold": self.context.slice_threshold,
                              "study_threshold": self.context.study_threshold}
        return out


def run_thresholds(run_dir: str | Path) -> dict:
    """A run folder's validated thresholds, as a model card holds them (context model included)."""
    meta = read_run_config(run_dir)
    metrics_path = Path(run_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(f"{run_dir}: no metrics.json, so the model's validated thresholds are unknown")
    metrics = json.loads(metrics_path.read_text())
    t = {"high_sensitivity": metrics["high_sensitivity"]["threshold"],
         "high_sensitivity_target": meta["config"]["target_sensitivity"], **study_decision(meta["config"], metrics)}
    context_path = Path(run_dir) / "context.json"
    if context_path.is_file():
        try:
            model = SliceContext.from_json(json.loads(context_path.read_text()))
            t["context"] = ContextDecision(model, metrics["context_high_sensitivity"]["threshold"],
                                           metrics["context_study_high_sensitivity"]["threshold"]).to_card()
        except (KeyError, ValueError) as exc:
            raise DataError(f"{run_dir}: context.json or its context_* metrics are unusable ({exc})") from None
    return t


def keras_model_path(path: str | Path) -> Path:
    """The Keras model behind a run folder, a .keras file, or a .tflite exported from a run."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "model.keras"
    elif path.suffix == ".keras":
        candidate = path
    else:  # RUN/export*/model_*.tflite
        candidate = path.parent.parent / "model.keras"
    if not candidate.is_file():
        raise DataError(f"{path}: no Keras model found beside it (Grad-CAM needs the run folder's model.keras)")
    return candidate


def xnnpack_allocates(path: Path) -> bool:
    """Whether LiteRT's default (XNNPACK) path can allocate ``path``, tried in a child process.

    ai-edge-litert 2.3.0 aborts the whole process ("double free or corruption") when XNNPACK
    allocates the int8 alpha-0.05 MobileNetV2, so the first try must not be in this one.
    """
    code = ("import sys; from ai_edge_litert.interpreter import Interpreter; "
            "Interpreter(model_path=sys.argv[1], num_threads=1).allocate_tensors()")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    return proc.returncode == 0


class Predictor(ABC):
    """``predict(x)``: uint8 inputs (N, size, size, 3) -> float probabilities (N,)."""

    kind: str
    preprocessing: Preprocessing
    source: Path
    decision: Decision | None = None  # set by load() from the run folder or model card

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray: ...

    @staticmethod
    def load(path: str | Path, num_threads: int | None = None, reference_kernels: bool = False) -> Predictor:
        """A run folder or ``.keras`` file (Keras), or a ``.tflite`` file (LiteRT).

        ``reference_kernels`` runs a .tflite with LiteRT's reference kernels, the arithmetic
        TensorFlow Lite Micro implements, instead of the optimised (XNNPACK) ones.
        """
        path = Path(path)
        predictor: Predictor
        if path.is_dir() or path.suffix == ".keras":
            run = path if path.is_dir() else path.parent
            predictor = KerasPredictor(run / "model.keras" if path.is_dir() else path, preprocessing_of(read_run_config(run)))
            if (run / "metrics.json").is_file():
                predictor.decision = Decision.of_run(run)
            return predictor
        if path.suffix == ".tflite":
            card_path = path.parent / "model_card.json"
            if not card_path.is_file():
                raise DataError(f"{path}: no model_card.json beside it, so its preprocessing is unknown")
            card = json.loads(card_path.read_text())
            predictor = LiteRTPredictor(path, preprocessing_of(card), num_threads, reference_kernels)
            predictor.decision = Decision.from_thresholds(card["thresholds"], predictor.runtime)
            return predictor
        raise DataError(f"{path}: not a run folder, .keras or .tflite model")


class KerasPredictor(Predictor):
    kind = "keras"

    def __init__(self, path: Path, preprocessing: Preprocessing) -> None:
        import keras

        if not path.is_file():
            raise DataError(f"{path}: model file not found")
        self.model = keras.models.load_model(path)
        self.preprocessing = preprocessing
        self.source = path

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float32)
        return self.model.predict(np.asarray(x, np.float32), batch_size=64, verbose=0).reshape(-1)


class LiteRTPredictor(Predictor):
    """A float32 or full-integer int8 ``.tflite`` model run by LiteRT (ai-edge-litert)."""

    def __init__(
        self, path: Path, preprocessing: Preprocessing, num_threads: int | None = None, reference_kernels: bool = False
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        if not path.is_file():
            raise DataError(f"{path}: model file not found")
        self.xnnpack = not reference_kernels and xnnpack_allocates(path)
        if reference_kernels:
            resolver = OpResolverType.BUILTIN_REF
        elif self.xnnpack:
            resolver = OpResolverType.AUTO
        else:
            log.warning("%s: LiteRT's XNNPACK delegate crashes on this model; using the builtin kernels", path)
            resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads,
                                       experimental_op_resolver_type=resolver)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.runtime = ("int8" if self.input["dtype"] == np.int8 else "float32") + (
            "-reference" if reference_kernels else "" if self.xnnpack else "-builtin")
        self.kind = "tflite-" + self.runtime
        self.preprocessing = preprocessing
        self.source = path

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """uint8 pixels to what the model's input tensor holds."""
        if self.input["dtype"] != np.int8:
            return np.asarray(x, np.float32)
        scale, zero = self.input["quantization"]
        q = np.round(np.asarray(x, np.float32) / scale + zero)
        return np.clip(q, -128, 127).astype(np.int8)

    def dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output["dtype"] != np.int8:
            return y.astype(np.float32)
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale

    def raw(self, x: np.ndarray) -> np.ndarray:
        """The output tensor as stored (int8 for the int8 model), one image at a time."""
        outs = []
        for image in self.quantize(x):
            self.interpreter.set_tensor(self.input["index"], image[None])
            self.interpreter.invoke()
            outs.append(self.interpreter.get_tensor(self.output["index"]).reshape(-1)[0])
        return np.array(outs, dtype=self.output["dtype"])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.raw(x))


# --- files to a worklist -------------------------------------------------------------------------

PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
EXPLAIN_CHOICES = ("none", "flagged", "all")


@dataclass
class Source:
    """One input file: its name (path or upload name) and, for uploads, its bytes."""

    name: str
    data: bytes | None = None

    def head(self) -> bytes:
        if self.data is not None:
            return self.data[:132]
        with open(self.name, "rb") as fh:
            return fh.read(132)


def file_kind(head: bytes) -> str | None:
    """'dicom', 'image' or None, decided by content, never by the file name."""
    if is_dicom(head):
        return "dicom"
    if head.startswith(PNG_MAGIC) or head.startswith(JPEG_MAGIC):
        return "image"
    return None


def gather_sources(paths: Sequence[str | Path]) -> tuple[list[Source], list[str]]:
    """Files given, and files in folders given (recursively, hidden ones left out)."""
    sources, errors = [], []
    for p in map(Path, paths):
        if p.is_dir():
            sources += [Source(str(f)) for f in sorted(p.rglob("*"))
                        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            sources.append(Source(str(p)))
        else:
            errors.append(f"{p}: not found")
    return sources, errors


@dataclass
class Prepared:
    """Model inputs of the readable slices, grouped into studies and ordered within them."""

    files: list[str]
    studies: list[str]
    indices: list[int]
    x: np.ndarray
    errors: list[str]


def prepare_sources(sources: Sequence[Source], pre: Preprocessing, image_study: str | None = None) -> Prepared:
    """Read, window, group, order and preprocess files; each unusable file is reported, not fatal.

    DICOM slices are grouped into series by their UIDs (named by hashes, never by patient
    fields) and ordered along the patient axis. PNG/JPEG images are taken as brain-window
    slices, one study per folder (or all in ``image_study``), in file-name order.
    """
    errors: list[str] = []
    ct: list[CTSlice] = []
    images: list[Source] = []
    for src in sources:
        try:
            kind = file_kind(src.head())
        except OSError as exc:
            errors.append(f"{src.name}: unreadable ({exc.strerror or exc})")
            continue
        if kind is None:
            errors.append(f"{src.name}: not a PNG, JPEG or DICOM file (judged by its content)")
        elif kind == "dicom":
            try:
                ct.append(read_ct_slice(src.name, src.data))
            except DataError as exc:
                errors.append(str(exc))
        else:
            images.append(src)

    files, studies, indices, xs = [], [], [], []

    def add(name: str, study: str, index: int, windows: dict[str, np.ndarray]) -> None:
        try:
            xs.append(prepare_slice(windows, pre))
        except DataError as exc:
            errors.append(f"{name}: {exc}")
            return
        files.append(name)
        studies.append(study)
        indices.append(index)

    for (study, series), members in order_series(ct).items():
        names = pre.windows
        for i, s in enumerate(members):
            windows = windowed(s.hu, names)
            if pre.channels == "2.5d":  # the series order gives the neighbours
                windows["previous"] = window(members[max(i - 1, 0)].hu, *WINDOWS["brain"])
                windows["next"] = window(members[min(i + 1, len(members) - 1)].hu, *WINDOWS["brain"])
            add(str(s.path), f"{study}/{series}", i, windows)

    if images and (pre.windows != ("brain",) or pre.channels == "2.5d"):
        errors += [f"{src.name}: channel mode {pre.channels} needs DICOM input (HU or slice order); "
                   "a PNG/JPEG is one brain-window image" for src in images]
        images = []
    counters: dict[str, int] = {}
    for src in sorted(images, key=lambda s: natural_key(s.name)):
        folder = image_study or str(Path(src.name).parent)
        try:
            image = read_image(Path(src.name), src.data)
        except DataError as exc:
            errors.append(str(exc))
            continue
        add(src.name, folder, counters.setdefault(folder, 0), {"brain": image})
        counters[folder] += 1
    x = np.stack(xs) if xs else np.zeros((0, pre.size, pre.size, 3), np.uint8)
    return Prepared(files, studies, indices, x, errors)


def natural_key(name: str) -> list:
    """Sort key that puts ``slice2.png`` before ``slice10.png``: image studies are ordered by name."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def safe_name(text: str) -> str:
    """A file-name-safe version of a study name (which may be a folder path)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text).strip("_.")[-80:] or "study"


@dataclass
class TriageResult:
    """Per-slice results, the worklist, every file that could not be used, and how it was scored."""

    slices: list[SliceResult]
    studies: list[StudyResult]
    errors: list[str]
    scoring: str  # "slice" or "slice context"
    slice_threshold: float
    study_threshold: float
    notes: list[str] = field(default_factory=list)  # cautions about the scores, e.g. unusual studies
    heatmaps: np.ndarray | None = None  # Grad-CAM per slice; rows not in `explained` are zeros
    explained: np.ndarray | None = None  # indices of the slices that have a heatmap


# Slice context was fitted on whole 5 mm head CTs (CT-ICH: 19 to 40 slices, 30 typical): with
# far fewer slices, or a thin-section series of hundreds, its neighbour and study features
# mean something else.
CONTEXT_STUDY_SLICES = (10, 60)


def triage(prepared: Prepared, predictor: Predictor, explain: str = "none", explainer=None,
           context: bool = False) -> TriageResult:
    """Score slices, aggregate studies at the model's validated thresholds, optionally explain.

    With ``context`` and a model trained with slice context, each slice is re-scored from its
    study (neighbours, study scores, position) and the context thresholds apply to slices and
    studies; the network's own output is kept in ``SliceResult.network_probability``. Off by
    default: on CT-ICH it raised slice AUC but not study AUC (README, "Input size and slice
    context"). ``explain`` is 'none', 'flagged' (heatmaps of flagged slices) or 'all'; it needs
    ``explainer``, an :class:`ichedge.explain.GradCAM` of the model's Keras version.
    """
    if explain not in EXPLAIN_CHOICES:
        raise ValueError(f"explain must be one of {EXPLAIN_CHOICES}")
    decision = predictor.decision
    if decision is None:
        raise DataError(f"{predictor.source}: no validated thresholds recorded with this model")
    network = predictor.predict(prepared.x)
    p, slice_t, study_t, scoring = network, decision.slice_threshold, decision.study_threshold, "slice"
    notes: list[str] = []
    if context and decision.context is None:
        notes.append(f"{predictor.source}: no slice-context stage in this model (train with --context); slices scored alone")
    if context and decision.context is not None and len(network):
        c = decision.context
        p = c.model.apply(network, prepared.studies, prepared.indices)
        slice_t, study_t, scoring = c.slice_threshold, c.study_threshold, "slice context"
        low, high = CONTEXT_STUDY_SLICES
        notes += [f"study {study} has {n} slice(s): slice context was fitted on whole 5 mm head CTs of about 30 "
                  "slices, so its scores here are less reliable"
                  for study, n in sorted(Counter(prepared.studies).items()) if not low <= n <= high]
    for note in notes:
        log.warning("%s", note)
    flagged = p >= slice_t
    slices = [SliceResult(f, s, i, float(q), bool(fl), network_probability=float(n) if scoring != "slice" else None)
              for f, s, i, q, fl, n in zip(prepared.files, prepared.studies, prepared.indices, p, flagged, network)]
    heatmaps = chosen = None
    if explain != "none":
        if explainer is None:
            raise ValueError("explanations need a GradCAM of the Keras model")
        chosen = np.nonzero(flagged)[0] if explain == "flagged" else np.arange(len(p))
        heatmaps = np.zeros(prepared.x.shape[:3], np.float32)
        if len(chosen):
            heatmaps[chosen] = explainer(prepared.x[chosen])[0]
    studies = build_worklist(slices, slice_t, decision.study_aggregate, study_t)
    return TriageResult(slices, studies, list(prepared.errors), scoring, slice_t, study_t, notes, heatmaps, chosen)


def write_triage(out_root: Path, result: TriageResult, prepared: Prepared, predictor: Predictor) -> Path:
    """A new folder under ``out_root``: slices.csv, worklist.csv/.json, errors.txt, heatmaps/."""
    from ichedge.explain import save_overlay
    from ichedge.training import run_folder

    with run_folder(Path(out_root), "predict") as folder:
        if result.explained is not None:
            (folder.tmp / "heatmaps").mkdir()
            for k in result.explained:
                s = result.slices[k]
                s.heatmap = f"heatmaps/{k:05d}_{safe_name(s.study)}_{s.index:04d}.png"  # k: unique
                save_overlay(folder.tmp / s.heatmap, prepared.x[k], result.heatmaps[k])
        d = predictor.decision
        meta = {"model": str(predictor.source), "kind": predictor.kind,
                "preprocessing": predictor.preprocessing.to_json(), "scoring": result.scoring,
                "slice_threshold": result.slice_threshold, "study_threshold": result.study_threshold,
                "study_aggregate": d.study_aggregate, "target_sensitivity": d.target_sensitivity,
                "notes": result.notes, "errors": result.errors}
        write_worklist(folder.tmp, result.slices, result.studies, meta)
        (folder.tmp / "errors.txt").write_text("".join(f"{e}\n" for e in result.errors))
    return folder.path
