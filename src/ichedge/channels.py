"""Channel modes: which window images of a slice fill the model's three input channels.

A mode declares the window images it reads (:attr:`ChannelMode.windows`) and what the data
must provide beyond them (:attr:`ChannelMode.needs`: ``"hu"``, Hounsfield units, so DICOM;
``"neighbours"``, the slices below and above, so patient IDs and slice numbers or a DICOM
series). :func:`ichedge.preprocess.prepare_slice` crops and resizes; the mode only arranges
planes. A new mode is one class here, registered in :data:`CHANNEL_MODES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np

from ichedge.registry import Registry

# Names of the neighbouring slices' brain-window images in a 2.5d sample.
PREVIOUS, NEXT = "previous", "next"

Resize = Callable[[np.ndarray], np.ndarray]


class ChannelMode:
    """Window images (float [0, 1], cropped, one size) -> three resized planes."""

    name: ClassVar[str]
    windows: ClassVar[tuple[str, ...]]  # window images read from the slice itself
    needs: ClassVar[frozenset[str]] = frozenset()
    help: ClassVar[str]

    def planes(self, images: dict[str, np.ndarray], resize: Resize) -> list[np.ndarray]:
        raise NotImplementedError

    @property
    def single_image(self) -> bool:
        """Whether one brain-window picture (a PNG/JPEG upload) is all this mode needs."""
        return self.windows == ("brain",) and not self.needs


CHANNEL_MODES: Registry[ChannelMode] = Registry("channel mode", instances=True)


@CHANNEL_MODES.register("gray")
class Gray(ChannelMode):
    name, windows, help = "gray", ("brain",), "brain window x3"

    def planes(self, images: dict[str, np.ndarray], resize: Resize) -> list[np.ndarray]:
        return [resize(images["brain"])] * 3


@CHANNEL_MODES.register("brain-bone")
class BrainBone(ChannelMode):
    name, windows, help = "brain-bone", ("brain", "bone"), "brain, bone, their mean"

    def planes(self, images: dict[str, np.ndarray], resize: Resize) -> list[np.ndarray]:
        brain, bone = resize(images["brain"]), resize(images["bone"])
        return [brain, bone, (brain + bone) / 2]


@CHANNEL_MODES.register("three-window")
class ThreeWindow(ChannelMode):
    name, windows, help = "three-window", ("brain", "subdural", "bone"), "brain, subdural, bone (DICOM data)"
    needs = frozenset({"hu"})

    def planes(self, images: dict[str, np.ndarray], resize: Resize) -> list[np.ndarray]:
        return [resize(images[w]) for w in self.windows]


@CHANNEL_MODES.register("2.5d")
class TwoAndAHalfD(ChannelMode):
    """The slices below and above as the outer channels, as the RSNA 2019 winners did."""

    name, windows, help = "2.5d", ("brain",), "brain window of the slices below, at, above"
    needs = frozenset({"neighbours"})

    def planes(self, images: dict[str, np.ndarray], resize: Resize) -> list[np.ndarray]:
        return [resize(images[w]) for w in (PREVIOUS, "brain", NEXT)]


def channel_mode(name: str) -> ChannelMode:
    """The registered mode ``name`` (ValueError naming the choices otherwise)."""
    return CHANNEL_MODES.get(name)
