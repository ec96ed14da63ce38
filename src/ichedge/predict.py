"""One way to get probabilities from any trained model: Keras, float LiteRT or int8 LiteRT.

:class:`Predictor` takes uint8 model inputs (as :mod:`ichedge.preprocess` makes them) and returns
the probability of hemorrhage per image, whatever runs underneath; evaluation, profiling and
later the service talk only to it. A model never travels without its preprocessing: a run
folder has it in ``config.json``, an exported ``.tflite`` in the ``model_card.json`` beside it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from ichedge.data import DataError, read_dataset
from ichedge.preprocess import Loaded, Preprocessing, load_inputs

log = logging.getLogger(__name__)


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir}: not a run folder (no config.json)")
    return json.loads(path.read_text())


def preprocessing_of(meta: dict) -> Preprocessing:
    p = meta["preprocessing"]
    return Preprocessing(size=p["size"], channels=p["channels"], crop=p["crop"])


def split_inputs(meta: dict, part: str) -> Loaded:
    """Reload the images of one part (train/val/test) of the split a run was trained on."""
    info = meta["dataset"]
    ds = read_dataset(info["source"], tuple(info["windows"]))
    position = {r.key: i for i, r in enumerate(ds.records)}
    wanted = meta["split"][part]
    missing = [k for k in wanted if k not in position]
    if missing:
        raise DataError(f"{info['source']}: {len(missing)} image(s) of the run's {part} split are gone, e.g. {missing[0]}")
    return load_inputs(ds, preprocessing_of(meta), [position[k] for k in wanted])


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

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray: ...

    @staticmethod
    def load(path: str | Path, num_threads: int | None = None, reference_kernels: bool = False) -> Predictor:
        """A run folder or ``.keras`` file (Keras), or a ``.tflite`` file (LiteRT).

        ``reference_kernels`` runs a .tflite with LiteRT's reference kernels, the arithmetic
        TensorFlow Lite Micro implements, instead of the optimised (XNNPACK) ones.
        """
        path = Path(path)
        if path.is_dir():
            return KerasPredictor(path / "model.keras", preprocessing_of(read_run_config(path)))
        if path.suffix == ".keras":
            return KerasPredictor(path, preprocessing_of(read_run_config(path.parent)))
        if path.suffix == ".tflite":
            card = path.parent / "model_card.json"
            if not card.is_file():
                raise DataError(f"{path}: no model_card.json beside it, so its preprocessing is unknown")
            return LiteRTPredictor(path, preprocessing_of(json.loads(card.read_text())), num_threads, reference_kernels)
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
        self.kind = ("tflite-int8" if self.input["dtype"] == np.int8 else "tflite-float32") + (
            "-reference" if reference_kernels else "" if self.xnnpack else "-builtin")
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
