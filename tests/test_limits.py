"""Bounded cost of an input: sizes checked from headers before decoding, bounded inflation,
bare DICOM datasets, and the service's admission and inference turns."""

import asyncio
import io
import threading
import time
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image

from ichedge.data import DataError, DecodeLimits, read_image
from ichedge.dicom import DicomError, read_ct_header, read_ct_slice
from ichedge.intake import Source, file_kind, prepare_sources
from ichedge.preprocess import Preprocessing
from ichedge.service import Admission, Busy, Turns
from tests.conftest import ct_phantom, write_ct_dicom


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_image_size_is_refused_from_the_header_before_decoding():
    limits = DecodeLimits(max_side=512, max_pixels=300 * 300)
    bomb = png(12000, 12000)  # about 140 KB on disk, 144 megapixels decoded
    assert len(bomb) < 300_000
    with pytest.raises(DataError, match=r"bomb.png: image of 12000x12000 pixels is over the limit"):
        read_image("bomb.png", bomb, limits)
    with pytest.raises(DataError, match="over the limit"):
        read_image("wide.png", png(5000, 1), limits)
    with pytest.raises(DataError, match="over the limit"):  # each side within, the product not
        read_image("square.png", png(400, 400), limits)
    assert read_image("ok.png", png(300, 300), limits).shape == (300, 300)


def test_unreadable_image_message_has_no_heap_address():
    with pytest.raises(DataError) as err:
        read_image("cut.png", png(64, 64)[:60])
    assert "0x" not in str(err.value) and str(err.value).startswith("cut.png: not a readable image")


def test_dicom_dimensions_are_refused_before_the_pixels_are_decoded(tmp_path):
    path = write_ct_dicom(tmp_path / "big.dcm", ct_phantom(np.random.default_rng(0), False, 96))
    with pytest.raises(DicomError, match=r"big.dcm: image of 96x96 pixels is over the limit"):
        read_ct_slice(path, limits=DecodeLimits(max_side=64))
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 40
    ds.save_as(tmp_path / "frames.dcm")
    with pytest.raises(DicomError, match="frames.dcm: 40 frame"):
        read_ct_slice(tmp_path / "frames.dcm")


def deflated(path, inflated_bytes: int) -> bytes:
    """A Deflated-syntax CT file whose dataset inflates to about ``inflated_bytes`` (a zip bomb)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    head = out.getvalue()
    meta_end = 132 + 12 + int.from_bytes(head[140:144], "little")  # preamble, DICM, group length element
    body = head[meta_end:]
    body += b"\xfe\xff\x00\xe0" + b"\x00" * 8  # padding the reader never gets to
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    filler = compressor.compress(body) + compressor.compress(bytes(inflated_bytes)) + compressor.flush()
    return head[:meta_end] + filler


def test_deflated_dicom_is_inflated_within_the_limit(tmp_path):
    path = write_ct_dicom(tmp_path / "a.dcm", ct_phantom(np.random.default_rng(0), False))
    bomb = deflated(path, 200 * 2**20)
    assert len(bomb) < 2**20  # under a megabyte on the wire
    with pytest.raises(DicomError, match=r"bomb.dcm: Deflated data inflates beyond 8 MiB"):
        read_ct_slice("bomb.dcm", bomb, DecodeLimits(max_inflated_bytes=8 * 2**20))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    honest = io.BytesIO()
    ds.save_as(honest, enforce_file_format=True)
    s = read_ct_slice("small.dcm", honest.getvalue(), DecodeLimits(max_inflated_bytes=8 * 2**20))
    np.testing.assert_allclose(s.hu, read_ct_slice(path).hu)


def test_a_bare_dicom_dataset_without_preamble_is_read(tmp_path):
    path = write_ct_dicom(tmp_path / "a.dcm", ct_phantom(np.random.default_rng(0), True))
    ds = pydicom.dcmread(path)
    del ds.file_meta
    ds.preamble = None
    bare = io.BytesIO()
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True)
    data = bare.getvalue()
    assert data[128:132] != b"DICM" and file_kind(data[:132]) == "dicom"
    np.testing.assert_allclose(read_ct_slice("bare.dcm", data).hu, read_ct_slice(path).hu)
    assert file_kind(b"hello, this is not a DICOM dataset at all" + bytes(100)) is None


def test_series_pixels_are_decoded_after_ordering_and_equal_an_eager_read(tmp_path):
    rng = np.random.default_rng(4)
    sources = [Source(str(write_ct_dicom(tmp_path / f"s{i}.dcm", ct_phantom(rng, i == 1), z=5.0 * (3 - i),
                                         instance=i + 1)))
               for i in range(3)]
    header = read_ct_header(sources[0].name)
    assert header.hu is None and header.position == 15.0
    pre = Preprocessing(size=32, channels="2.5d")
    prepared = prepare_sources(sources, pre)
    assert prepared.errors == [] and prepared.indices == [0, 1, 2]
    assert [p.rsplit("/", 1)[1] for p in prepared.files] == ["s2.dcm", "s1.dcm", "s0.dcm"]
    hu = [read_ct_slice(s.name).hu for s in sources]
    assert np.array_equal(header.pixels(), hu[0])
    assert prepared.x.shape == (3, 32, 32, 3)


def test_admission_refuses_beyond_the_waiting_line():
    async def scenario():
        admission = Admission(active=1, waiting=1)
        release = asyncio.Event()
        outcomes = []

        async def request(name):
            try:
                async with admission.slot():
                    outcomes.append(f"{name} in")
                    await release.wait()
            except Busy:
                outcomes.append(f"{name} busy")

        tasks = [asyncio.create_task(request(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(*tasks)
        return outcomes

    assert asyncio.run(scenario()) == ["a in", "c busy", "b in"]


def test_turns_let_a_small_request_in_between_the_turns_of_a_large_one():
    turns, log = Turns(size=2), []

    def slow(tag):
        def model(x):
            log.append((tag, len(x)))
            time.sleep(0.05)
            return np.zeros(len(x))
        return model

    big = threading.Thread(target=turns, args=(slow("big"), np.zeros(20)))
    big.start()
    time.sleep(0.08)  # the large request is in its second turn
    assert len(turns(slow("small"), np.zeros(1))) == 1
    big.join()
    position = log.index(("small", 1))
    assert 1 <= position <= 3, log  # after at most two turns of the large one, not after all ten
    assert sum(n for tag, n in log if tag == "big") == 20
