"""What a model costs on a device, measured: parameters, MACs, flash, RAM, latency, accuracy.

Flash is the int8 ``.tflite`` size (what the C array puts in flash), RAM the smallest TFLM
tensor arena that runs it (found by search in the real microcontroller runtime), latency the
median of LiteRT single-thread runs on this host after warm-up. Accuracy compares the int8 and
float32 models with the Keras model on the run's own held-out test patients.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from ichedge.data import DataError
from ichedge.evaluation import binary_metrics
from ichedge.runs import RunFolder
from ichedge.runtimes import LiteRTPredictor, Predictor
from ichedge.tflm import find_arena, run_tflm


def macs_by_operator(model_path: Path) -> dict[str, int]:
    """Multiply-accumulates of one inference per operator type (convolution, depthwise, dense) of a .tflite."""
    it = Interpreter(model_path=str(model_path))
    shapes = {t["index"]: t["shape"] for t in it.get_tensor_details()}
    macs = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 0, "FULLY_CONNECTED": 0}
    for op in it._get_ops_details():  # the public API has no per-op listing
        name, ins, outs = op["op_name"], op["inputs"], op["outputs"]
        if name == "CONV_2D":
            _, kh, kw, cin = shapes[ins[1]]
            macs[name] += int(np.prod(shapes[outs[0]])) * kh * kw * cin
        elif name == "DEPTHWISE_CONV_2D":
            _, kh, kw, _ = shapes[ins[1]]
            macs[name] += int(np.prod(shapes[outs[0]])) * kh * kw
        elif name == "FULLY_CONNECTED":
            _, in_units = shapes[ins[1]]
            macs[name] += int(in_units * np.prod(shapes[outs[0]]))  # every output value sums in_units products
    return {k: int(v) for k, v in macs.items()}


def count_macs(model_path: Path) -> int:
    """Multiply-accumulates of one inference, from the convolution and dense ops of a .tflite."""
    return sum(macs_by_operator(model_path).values())


def latency_ms(predictor: LiteRTPredictor, image: np.ndarray, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median and spread of single-image inference time, in milliseconds."""
    x = predictor.quantize(image[None])
    it, index = predictor.interpreter, predictor.input["index"]
    times = []
    for i in range(warmup + runs):
        it.set_tensor(index, x)
        start = time.perf_counter()
        it.invoke()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return {"median": float(np.median(times)), "p90": float(np.percentile(times, 90)), "runs": runs}


def tflm_agreement(int8: LiteRTPredictor, reference: LiteRTPredictor, x: np.ndarray, arena: int) -> dict[str, float]:
    """Run the same int8 inputs through TFLM and LiteRT; how far apart are their int8 outputs?

    TFLM implements LiteRT's reference kernels, so those should agree to a step or so; LiteRT's
    default optimised kernels (XNNPACK) round differently and are reported too.
    """
    run = run_tflm(int8.source, arena, int8.quantize(x))
    if not run.ok:
        raise DataError(f"{int8.source}: TFLM could not run with the {arena}-byte arena it was sized for: {run.error}")
    micro = run.outputs.reshape(-1).astype(int)
    out = {"images": int(len(x))}
    for name, predictor in (("reference", reference), ("default", int8)):
        diff = np.abs(micro - predictor.raw(x).astype(int))
        out[f"max_abs_diff_vs_litert_{name}"] = int(diff.max())
        out[f"identical_vs_litert_{name}"] = float((diff == 0).mean())
    return out


def profile_run(run_dir: str | Path, export_dir: str | Path | None = None, runs: int = 50,
                tflm_images: int = 32) -> dict:
    """Profile an exported run: sizes, compute, TFLM memory and agreement, latency, accuracy."""
    run = RunFolder.open(run_dir)
    export = run.export(export_dir)
    meta = run.meta
    keras_p = Predictor.load(run.path)
    int8 = Predictor.load(export.model_file("int8"), num_threads=1)
    int8_ref = Predictor.load(export.model_file("int8"), num_threads=1, reference_kernels=True)
    flt = Predictor.load(export.model_file("float32"), num_threads=1)
    test = run.split_part("test")[0]
    arena = find_arena(int8.source)
    accuracy = {}
    for name, predictor in (("keras", keras_p), ("float32", flt), ("int8", int8), ("int8_reference", int8_ref)):
        accuracy[name] = _scores(predictor, test.x, test.y)
    profile = {
        "run": run.path.name, "export": export.path.name,
        "config": {k: meta["config"][k] for k in ("size", "alpha", "channels")},
        "parameters": int(keras_p.model.count_params()),
        "macs": count_macs(int8.source),
        "flash_bytes": int8.source.stat().st_size,
        "float32_bytes": flt.source.stat().st_size,
        "tflm_arena_bytes": arena,
        "tflm_agreement": tflm_agreement(int8, int8_ref, test.x[:tflm_images], arena),
        "latency_ms": {"int8": latency_ms(int8, test.x[0], runs), "float32": latency_ms(flt, test.x[0], runs)},
        "litert_default_kernels": "XNNPACK" if int8.xnnpack else "builtin (XNNPACK crashed on this model)",
        "accuracy": accuracy,
        "int8_auc_drop": accuracy["float32"]["auc"] - min(accuracy["int8"]["auc"], accuracy["int8_reference"]["auc"]),
    }
    export.write_profile(profile)
    return profile


def _scores(predictor: Predictor, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    m = binary_metrics(y, predictor.predict(x), 0.5)
    return {k: m[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "loss")}


def format_profile(p: dict) -> str:
    acc = p["accuracy"]
    return "\n".join([
        f"{p['config']['size']}x{p['config']['size']}, alpha {p['config']['alpha']:g}: "
        f"{p['parameters']:,} parameters, {p['macs'] / 1e6:.1f} M MACs",
        f"  flash (int8 model): {p['flash_bytes'] / 1024:.1f} KiB   RAM (TFLM arena): {p['tflm_arena_bytes'] / 1024:.1f} KiB",
        f"  TFLM vs LiteRT int8 outputs on {p['tflm_agreement']['images']} test images, max difference in int8 steps: "
        f"{p['tflm_agreement']['max_abs_diff_vs_litert_reference']} vs reference kernels, "
        f"{p['tflm_agreement']['max_abs_diff_vs_litert_default']} vs default kernels ({p['litert_default_kernels']})",
        f"  host latency, LiteRT 1 thread, median: int8 {p['latency_ms']['int8']['median']:.2f} ms, "
        f"float32 {p['latency_ms']['float32']['median']:.2f} ms",
        f"  test AUC: Keras {acc['keras']['auc']:.3f}, float32 {acc['float32']['auc']:.3f}, int8 {acc['int8']['auc']:.3f} "
        f"(reference kernels, as TFLM: {acc['int8_reference']['auc']:.3f}; worst int8 drop {p['int8_auc_drop']:+.3f})",
    ])
