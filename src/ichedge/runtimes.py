"""One way to get probabilities from any trained model, whatever runs it.

:class:`Predictor` takes uint8 model inputs (as :mod:`ichedge.preprocess` makes them) and
returns the probability of hemorrhage per image. Runtimes register in :data:`RUNTIMES`: Keras
(a run folder or its ``.keras``) and LiteRT (an exported float32 or int8 ``.tflite``). A model
never travels without its preprocessing and validated thresholds (:class:`Decision`): a run
folder has them in its config and metrics, an exported model in the card beside it. A site's
own thresholds (``ichedge calibrate``) replace them when :meth:`Predictor.load` is given the site.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from ichedge.data import DataError
from ichedge.model import sha256
from ichedge.output import native_output_silenced
from ichedge.preprocess import Preprocessing
from ichedge.quality import InputReference
from ichedge.registry import Registry
from ichedge.runs import SITE_PROFILES, ExportFolder, RunFolder
from ichedge.thresholds import Decision

log = logging.getLogger(__name__)


# Model sha256 -> whether XNNPACK allocated it: one child process per model, not per predictor.
_XNNPACK_PROBES: dict[str, bool] = {}


def xnnpack_allocates(path: Path) -> bool:
    """Whether LiteRT's default (XNNPACK) path can allocate ``path``, tried in a child process.

    ai-edge-litert 2.3.0 aborts the whole process ("double free or corruption") when XNNPACK
    allocates the int8 alpha-0.05 MobileNetV2, so the first try must not be in this one.
    """
    try:
        key: str | None = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        key = None  # the child reports what is wrong with the file
    if key in _XNNPACK_PROBES:
        return _XNNPACK_PROBES[key]
    code = ("import sys; from ai_edge_litert.interpreter import Interpreter; "
            "Interpreter(model_path=sys.argv[1], num_threads=1).allocate_tensors()")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    if key is not None:
        _XNNPACK_PROBES[key] = proc.returncode == 0
    return proc.returncode == 0


class Predictor(ABC):
    """``predict(x)``: uint8 inputs (N, size, size, 3) -> float probabilities (N,).

    A runtime registers its class in :data:`RUNTIMES` with the file suffix it runs
    (:attr:`suffix`) and :meth:`open`, which reads the model's preprocessing and validated
    thresholds from where they travel with it.
    """

    kind: str
    runtime: str  # whose arithmetic gives the probabilities: 'keras', 'int8', 'float32-builtin', ...
    suffix: ClassVar[str]
    preprocessing: Preprocessing
    source: Path
    decision: Decision | None = None  # set by open() from the run folder or model card
    reference: InputReference | None = None  # the training inputs' statistics, for the OOD score

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray: ...

    @classmethod
    @abstractmethod
    def open(cls, path: Path, num_threads: int | None = None, reference_kernels: bool = False) -> Predictor: ...

    @staticmethod
    def load(path: str | Path, num_threads: int | None = None, reference_kernels: bool = False,
             site: str | None = None) -> Predictor:
        """A run folder or a model file of any registered runtime (``.keras``, ``.tflite``).

        ``reference_kernels`` runs a .tflite with LiteRT's reference kernels, the arithmetic
        TensorFlow Lite Micro implements, instead of the optimised (XNNPACK) ones. ``site`` uses
        that site's newest profile in the model's run folder instead of the validated thresholds.
        The input reference comes from the model card (exports) or the run folder.
        """
        path = Path(path)
        suffix = KerasPredictor.suffix if path.is_dir() else path.suffix
        for runtime in RUNTIMES:
            if runtime.suffix == suffix:
                predictor = runtime.open(path, num_threads, reference_kernels)
                if predictor.reference is None and (run := RunFolder.of_model(path)) is not None:
                    predictor.reference = _reference(run.input_reference(), path)
                if site is not None:
                    predictor.use_site(site)
                return predictor
        raise DataError(f"{path}: not a run folder, {' or '.join(r.suffix for r in RUNTIMES)} model")

    def use_site(self, site: str) -> None:
        """Decide at ``site``'s thresholds: its newest profile in the run folder of this model."""
        run = RunFolder.of_model(self.source)
        if run is None:
            raise DataError(f"{self.source}: no run folder beside this model, so no {SITE_PROFILES}/ to take site "
                            f"{site!r} from")
        if self.decision is None:
            raise DataError(f"{self.source}: no validated thresholds recorded with this model")
        self.decision = self.decision.with_site(run.site_profile(site), self.runtime, sha256(self.source))


def _reference(saved: dict | None, source: Path) -> InputReference | None:
    """A model's input reference; one this ichedge cannot read costs the OOD score, not the model."""
    if not saved:
        return None
    try:
        return InputReference.from_json(saved)
    except DataError as exc:
        log.warning("%s: input reference unusable (%s); no OOD score for this model", source, exc)
        return None


RUNTIMES: Registry[type[Predictor]] = Registry("runtime")


@RUNTIMES.register("keras")
class KerasPredictor(Predictor):
    kind = runtime = "keras"
    suffix = ".keras"

    @classmethod
    def open(cls, path: Path, num_threads: int | None = None, reference_kernels: bool = False) -> KerasPredictor:
        """A run folder or its ``.keras`` file; thread count and kernels are LiteRT's options."""
        run = RunFolder.open(path if path.is_dir() else path.parent)
        predictor = cls(run.model_file if path.is_dir() else path, run.preprocessing)
        if run.has_metrics:
            predictor.decision = Decision.of_run(run)
        return predictor

    def __init__(self, path: Path, preprocessing: Preprocessing) -> None:
        if not path.is_file():
            raise DataError(f"{path}: model file not found")
        self.model = keras.models.load_model(path)
        self.preprocessing = preprocessing
        self.source = path

    def predict(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0, np.float32)
        return self.model.predict(np.asarray(x, np.float32), batch_size=64, verbose=0).reshape(-1)


@RUNTIMES.register("litert")
class LiteRTPredictor(Predictor):
    """A float32 or full-integer int8 ``.tflite`` model run by LiteRT (ai-edge-litert)."""

    suffix = ".tflite"

    @classmethod
    def open(cls, path: Path, num_threads: int | None = None, reference_kernels: bool = False) -> LiteRTPredictor:
        """An exported model; its card beside it gives the preprocessing and thresholds."""
        card = ExportFolder.of_model(path).card()
        predictor = cls(path, Preprocessing.from_json(card["preprocessing"]), num_threads, reference_kernels)
        predictor.decision = Decision.from_thresholds(card["thresholds"], predictor.runtime)
        predictor.reference = _reference(card.get("input_reference"), path)
        return predictor

    def __init__(
        self, path: Path, preprocessing: Preprocessing, num_threads: int | None = None, reference_kernels: bool = False
    ) -> None:
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
        with native_output_silenced():  # LiteRT announces its XNNPACK delegate from C++
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
