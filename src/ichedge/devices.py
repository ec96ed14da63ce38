"""Target devices: a RAM/flash/latency budget, microcontroller cores, and what an architecture
costs on them, measured from its graph alone.

RAM is the TFLM tensor arena and flash the int8 ``.tflite`` size, both measured on the real
converter and runtime (:mod:`ichedge.export`, :mod:`ichedge.tflm`); neither depends on the
weights' values, so an untrained graph answers whether a configuration fits before any training.
Latency on a microcontroller is an *estimate*: MACs divided by a published throughput.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from ichedge.export import to_int8_tflite
from ichedge.model import Weights, build_model
from ichedge.profiling import latency_ms, macs_by_operator
from ichedge.runtimes import LiteRTPredictor
from ichedge.preprocess import Preprocessing
from ichedge.tflm import find_arena

log = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "kib": 1024, "mib": 1024**2}


def parse_bytes(text: str) -> int:
    """``"256KiB"`` -> 262144; KiB/MiB are binary, kB/MB decimal, a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KkMm]i?[Bb]|[Bb])?\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size such as 256KiB, 1MiB or 512kB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def kib(n: float) -> str:
    return f"{n / 1024:.1f}"


@dataclass(frozen=True)
class MCU:
    """A microcontroller core at a clock, and the int8 throughput its estimate assumes."""

    name: str
    clock_mhz: float
    macs_per_cycle: float
    example: str
    source: str

    def latency_ms(self, macs: int) -> float:
        """Estimated inference time: every MAC at the published rate, other operators ignored."""
        return macs / self.macs_per_cycle / (self.clock_mhz * 1e3)


# CMSIS-NN's CIFAR-10 CNN (3 conv layers of 5x5 kernels, about 12.3 M MACs) ran in 99.1 ms on a
# 216 MHz Cortex-M7 (STM32F746): 0.57 MAC per cycle. The Cortex-M4 has the same int8 SIMD
# multiply-accumulate but single issue; Arm's CoreMark/MHz (3.40 against 5.01) scales it to 0.39.
# Depthwise convolutions, most of MobileNetV2's operators, run below that rate in CMSIS-NN, so
# these estimates are optimistic, within a factor of about 2.
CMSIS_NN = ("estimate: MACs / published CMSIS-NN throughput (Lai, Suda, Chandra 2018, 'CMSIS-NN: Efficient "
            "Neural Network Kernels for Arm Cortex-M CPUs', arXiv:1801.06601: CIFAR-10 CNN, 12.3 M MACs in 99.1 ms "
            "on a 216 MHz Cortex-M7)")
MCUS: dict[str, MCU] = {
    "cortex-m4": MCU("cortex-m4", 64, 0.39, "nRF52840 (Arduino Nano 33 BLE Sense): 256 KB RAM, 1 MB flash",
                     CMSIS_NN + "; Cortex-M4 scaled by Arm's CoreMark/MHz, 3.40 against 5.01"),
    "cortex-m7": MCU("cortex-m7", 216, 0.57, "STM32F746 (32F746G-DISCOVERY): 320 KB RAM, 1 MB flash", CMSIS_NN),
    "cortex-m7-h7": MCU("cortex-m7-h7", 480, 0.57, "STM32H743 (NUCLEO-H743ZI): 1 MB RAM, 2 MB flash", CMSIS_NN),
}


def mcu(name: str, clock_mhz: float | None = None) -> MCU:
    if name not in MCUS:
        raise ValueError(f"unknown MCU {name!r}; choose from {', '.join(MCUS)}")
    chosen = MCUS[name]
    if clock_mhz is not None:
        chosen = MCU(chosen.name, clock_mhz, chosen.macs_per_cycle, chosen.example, chosen.source)
    return chosen


@dataclass(frozen=True)
class Budget:
    """What the target device offers: TFLM arena and flash in bytes, optionally a latency limit."""

    ram: int
    flash: int
    latency_ms: float | None = None
    mcu: MCU = MCUS["cortex-m4"]

    def __post_init__(self) -> None:
        if self.ram <= 0 or self.flash <= 0:
            raise ValueError("RAM and flash budgets must be positive")

    def over(self, cost: GraphCost) -> list[str]:
        """Why ``cost`` does not fit, one phrase per limit it passes (empty when it fits)."""
        why = []
        if cost.arena_bytes > self.ram:
            why.append(f"TFLM arena {kib(cost.arena_bytes)} KiB > {kib(self.ram)} KiB")
        if cost.flash_bytes > self.flash:
            why.append(f"flash {kib(cost.flash_bytes)} KiB > {kib(self.flash)} KiB")
        if self.latency_ms is not None and (est := self.mcu.latency_ms(cost.macs)) > self.latency_ms:
            why.append(f"estimated {est:.0f} ms on {self.mcu.name} > {self.latency_ms:g} ms")
        return why

    def to_json(self) -> dict:
        return {"ram_bytes": self.ram, "flash_bytes": self.flash, "latency_ms": self.latency_ms,
                "mcu": asdict(self.mcu)}


@dataclass(frozen=True)
class Architecture:
    """What decides a model's cost on a device: its graph, not its weights."""

    size: int
    alpha: float
    head: str = "paper"
    trim: bool = False

    @property
    def key(self) -> str:
        return f"{self.size}px-a{self.alpha:g}-{self.head}" + ("-trim" if self.trim else "")


@dataclass(frozen=True)
class GraphCost:
    """Measured on an untrained int8 graph: flash, TFLM arena, MACs, parameters, host latency."""

    flash_bytes: int
    arena_bytes: int
    macs: int
    parameters: int
    host_ms: float
    macs_by_operator: dict[str, int]

    def to_json(self) -> dict:
        return asdict(self)


def _randomised(model: keras.Model, seed: int) -> None:
    """Distinct random weights everywhere: the converter stores identical constant buffers once, so
    an initial graph (zero biases, unit batch-norm) would look smaller in flash than a trained one."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        shape = tuple(w.shape)
        value = rng.uniform(0.5, 1.5, shape) if "variance" in w.path else rng.normal(0, 0.1, shape)
        w.assign(value.astype("float32"))


def graph_cost(arch: Architecture, seed: int = 0) -> GraphCost:
    """Convert an untrained ``arch`` to int8 and measure it: seconds, before any training."""
    model = build_model(arch.alpha, arch.size, Weights("random"), trim=arch.trim, head=arch.head, seed=seed)
    _randomised(model, seed)
    calibration = np.random.default_rng(seed).integers(0, 256, (8, arch.size, arch.size, 3)).astype("float32")
    data = to_int8_tflite(model, calibration)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph_int8.tflite"
        path.write_bytes(data)
        predictor = LiteRTPredictor(path, Preprocessing(size=arch.size), num_threads=1)
        host = latency_ms(predictor, calibration[0].astype("uint8"), runs=20)["median"]
        by_operator = macs_by_operator(path)
        return GraphCost(len(data), find_arena(path), sum(by_operator.values()), int(model.count_params()), host,
                         by_operator)
