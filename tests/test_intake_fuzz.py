"""Fuzzing the intake: whatever bytes arrive, every file is either scored or reported by name,
nothing raises, and no message carries a heap address or header values."""

import io
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ichedge.intake import Source, prepare_sources
from ichedge.preprocess import Preprocessing
from tests.conftest import PHI, ct_phantom, synthetic_slice, write_ct_dicom

PRE = Preprocessing(size=32)
ADDRESS = re.compile(r"0x[0-9a-f]{6,}")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """Valid inputs of each kind, to mutate."""
    folder = tmp_path_factory.mktemp("fuzz")
    image = io.BytesIO()
    Image.fromarray(synthetic_slice(np.random.default_rng(0), True)).save(image, format="PNG")
    jpeg = io.BytesIO()
    Image.fromarray(synthetic_slice(np.random.default_rng(1), False)).save(jpeg, format="JPEG")
    dicom = write_ct_dicom(folder / "a.dcm", ct_phantom(np.random.default_rng(2), True)).read_bytes()
    return {"png": image.getvalue(), "jpeg": jpeg.getvalue(), "dicom": dicom}


mutation = st.tuples(
    st.sampled_from(["png", "jpeg", "dicom"]),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)), max_size=6),
    st.floats(0.05, 1.0),
)


def mutate(data: bytes, edits, keep: float) -> bytes:
    out = bytearray(data[: max(1, int(len(data) * keep))])
    for where, chunk in edits:
        at = int(where * len(out))
        out[at:at + len(chunk)] = chunk
    return bytes(out)


def check(sources: list[Source]) -> None:
    prepared = prepare_sources(sources, PRE)
    reported = {e.split(": ", 1)[0] for e in prepared.errors}
    for src in sources:
        assert (src.name in prepared.files) != (src.name in reported), (src.name, prepared.errors)
    for e in prepared.errors:
        assert not ADDRESS.search(e) and all(secret not in e for secret in PHI.values()), e
    assert prepared.x.shape == (len(prepared.files), 32, 32, 3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_are_scored_or_reported_by_name(seeds, cases):
    check([Source(f"f{i}.{kind}", mutate(seeds[kind], edits, keep)) for i, (kind, edits, keep) in enumerate(cases)])


@settings(max_examples=60, deadline=None)
@given(prefix=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", bytes(128) + b"DICM", b"\x08\x00\x05\x00CS", b""]),
       body=st.binary(max_size=600))
def test_random_bytes_behind_a_magic_number_are_reported(prefix, body):
    check([Source("random.bin", prefix + body)])
