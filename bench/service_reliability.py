"""Reliability bench of `ichedge serve`: the security review's hostile requests, replayed on loopback.

Usage: python bench/service_reliability.py RUN_DIR [--skip-large]
Starts `ichedge serve` (the run's int8 export, a bearer token, a temporary ICHEDGE_HOME) on a free
loopback port and replays each case: false reassurance (blank, tiny and thin images, DICOM with a
NaN or huge RescaleSlope), decompression bombs (a 12000x12000 PNG of zeros, a Deflated DICOM),
oversized and concurrent uploads, lying and slow clients, cross-origin and rebinding requests, a
small request behind a 64-slice one. For each: the status, the server's peak memory over its
resident memory before the case (Linux /proc: VmHWM after resetting it through clear_refs), and
the time. Prints a Markdown table. Loopback only, bounded: no case runs longer than about 90 s.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

MIB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def head_hu(size: int, rng: np.random.Generator) -> np.ndarray:
    """A head phantom in HU: air, a skull ring, brain, noise."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < size * 0.4] = 1000.0
    hu[r < size * 0.35] = 35.0
    return hu + rng.normal(0, 3, hu.shape)


def ct_dicom(hu: np.ndarray, z: float, series: str, slope: float = 1.0, deflate: bool = False) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflate else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.PatientName, ds.PatientID = "BENCH^PHANTOM", "BENCH-0001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series.rsplit(".", 1)[0], series
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, z], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.RescaleSlope, ds.RescaleIntercept = slope, -1024.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = np.round(hu + 1024).astype(np.int16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def deflate_bomb(inflated: int) -> bytes:
    """A Deflated CT file whose dataset inflates to ``inflated`` bytes (zeros after a valid slice)."""
    hu, series = head_hu(64, np.random.default_rng(0)), "1.2.826.0.1.3680043.8.498.5.1"
    deflated, plain = ct_dicom(hu, 0.0, series, deflate=True), ct_dicom(hu, 0.0, series)
    meta_end = lambda data: 144 + int.from_bytes(data[140:144], "little")  # noqa: E731 (preamble, group length)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = squeeze.compress(plain[meta_end(plain):])
    zeros = bytes(16 * MIB)
    for _ in range(inflated // len(zeros)):
        body += squeeze.compress(zeros)
    return deflated[:meta_end(deflated)] + body + squeeze.flush()


class Server:
    """`ichedge serve` in a child process, with its memory readable from /proc."""

    def __init__(self, run: Path, home: Path) -> None:
        self.port, self.home = free_port(), home
        env = {**os.environ, "ICHEDGE_HOME": str(home)}
        tokens = home / "tokens.json"
        created = subprocess.run([sys.executable, "-m", "ichedge.cli", "token", "create", "bench", "--tokens",
                                  str(tokens)], capture_output=True, text=True, env=env, check=True)
        self.token = created.stdout.strip().splitlines()[-1]
        self.log = open(home / "server.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "ichedge.cli", "serve", "--model", str(run), "--port",
                                      str(self.port), "--tokens", str(tokens)], stdout=self.log, stderr=self.log,
                                     env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = {"authorization": f"Bearer {self.token}"}
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"the service did not start; its log:\n{(home / 'server.log').read_text()}")

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def measure(self, case: Callable[[], str]) -> tuple[str, float, float]:
        """Run ``case``; its outcome, the server's peak memory over its memory before, seconds."""
        time.sleep(0.3)
        before = self.status("VmRSS")
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        outcome = case()
        seconds = time.perf_counter() - start
        return outcome, (self.status("VmHWM") - before) / MIB, seconds

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.seek(0)
        return self.log.read()


def post(server: Server, items: list[tuple[str, bytes]], heatmap: bool = False, headers: dict | None = None,
         timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/api/studies?heatmap={str(heatmap).lower()}", timeout=timeout,
                      files=[("files", (n, d, "application/octet-stream")) for n, d in items],
                      headers={**server.auth, **(headers or {})})


def summary(r: httpx.Response) -> str:
    if r.status_code == 200:
        studies = r.json()["studies"]
        return f"200 ({sum(s['slices'] for s in studies)} slices scored)"
    detail = r.json().get("detail") if "json" in r.headers.get("content-type", "") else r.text[:60]
    if isinstance(detail, dict):
        detail = "; ".join(e["error"].split(": ", 1)[1] for e in detail.get("errors", []))[:80]
    return f"{r.status_code} {str(detail)[:80]}"


def raw(server: Server, head: bytes, body_chunks: list[bytes], pause: float, limit: float = 90) -> str:
    """Send a request by hand, ``pause`` seconds between chunks; when and how the server ends it."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(limit)
        try:
            s.sendall(head)
            for chunk in body_chunks:
                time.sleep(pause)
                s.sendall(chunk)
                if time.perf_counter() - start > limit:
                    return f"still open after {limit:.0f} s"
            answer = s.recv(4096)
        except (BrokenPipeError, ConnectionResetError):
            return f"dropped after {time.perf_counter() - start:.1f} s"
        except socket.timeout:
            return f"still open after {limit:.0f} s"
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed, no answer"
    return f"{status} after {time.perf_counter() - start:.1f} s"


PART = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'  # then slow bytes


def multipart_head(server: Server, length: int) -> bytes:
    return (f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {length}\r\n\r\n").encode()


def concurrently(calls: list[Callable[[], str]]) -> str:
    results: list[str] = [""] * len(calls)
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, calls[k]())) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts: dict[str, int] = {}
    for r in results:
        key = r.split(" after ")[0] if r.startswith("HTTP/") else r.split(" ", 1)[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n}x {status}" for status, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, metavar="RUN_DIR", help="a run folder with an int8 export (ichedge export)")
    ap.add_argument("--skip-large", action="store_true", help="leave out the 120 MiB uploads")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    series = "1.2.826.0.1.3680043.8.498.7.1"
    slice_512 = [ct_dicom(head_hu(512, rng), 5.0 * i, series) for i in range(4)]
    one = [("one.dcm", slice_512[0])]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.run, Path(tmp))
        big_series = [(f"s{i:03d}.dcm", slice_512[i % 4]) for i in range(230)]  # about 115 MiB
        cases: list[tuple[str, str, Callable[[], str]]] = [
            ("blank 9000x9000 PNG", "refused", lambda: summary(post(server, [("blank.png", png(np.zeros((9000, 9000),
                                                                                                  np.uint8)))]))),
            ("1x1 PNG", "refused", lambda: summary(post(server, [("one.png", png(np.full((1, 1), 90, np.uint8)))]))),
            ("5000x1 PNG", "refused", lambda: summary(post(server, [("thin.png", png(np.full((1, 5000), 90, np.uint8)))]))),
            ("DICOM, RescaleSlope NaN", "refused",
             lambda: summary(post(server, [("nan.dcm", ct_dicom(head_hu(512, rng), 0, series, slope=float("nan")))]))),
            ("DICOM, RescaleSlope 1e308", "refused",
             lambda: summary(post(server, [("huge.dcm", ct_dicom(head_hu(512, rng), 0, series, slope=1e308))]))),
            ("12000x12000 PNG of zeros (bomb)", "refused from header",
             lambda: summary(post(server, [("bomb.png", png(np.zeros((12000, 12000), np.uint8)))]))),
            ("Deflated DICOM inflating to 2 GiB", "refused at 64 MiB",
             lambda: summary(post(server, [("bomb.dcm", deflate_bomb(2 * 1024 * MIB))]))),
            ("one 512x512 CT slice", "200", lambda: summary(post(server, one))),
            ("one slice, heatmap", "200", lambda: summary(post(server, one, heatmap=True))),
            ("4 concurrent 240 MiB uploads", "413 before reading",
             lambda: concurrently([lambda: raw(server, multipart_head(server, 240 * MIB), [b"x" * 1000], 0.1)
                                   for _ in range(4)])),
            ("Content-Length 1000, 10 bytes sent", "408 within body timeout",
             lambda: raw(server, multipart_head(server, 1000), [b"--xyz\r\n123"], 0.0)),
            ("body at 1 byte/s", "408 within body timeout",
             lambda: raw(server, multipart_head(server, 500), [PART] + [b"x"] * 400, 1.0)),
            ("a header line per second", "closed within header timeout",
             lambda: raw(server, b"GET /api/health HTTP/1.1\r\n", [b"X-a: b\r\n"] * 90, 1.0)),
            ("idle socket", "closed within header timeout", lambda: raw(server, b"", [], 0.0)),
            ("aborted upload", "no traceback",
             lambda: raw(server, multipart_head(server, 10 * MIB), [], 0.0, limit=0.5) and "aborted by the client"),
            ("no token", "401", lambda: summary(post(server, one, headers={"authorization": ""}))),
            ("cross-origin POST", "403", lambda: summary(post(server, one, headers={"origin": "https://evil.example"}))),
            ("Host: evil.example (rebinding)", "400",
             lambda: f"{httpx.get(f'{server.url}/api/health', headers={'host': 'evil.example'}).status_code}"),
            ("HEAD /api/health", "200", lambda: f"{httpx.head(f'{server.url}/api/health').status_code}"),
            ("20 concurrent one-slice requests", "200s, then 503 + Retry-After",
             lambda: concurrently([lambda: summary(post(server, one)) for _ in range(20)])),
        ]
        if not args.skip_large:
            cases += [
                ("230 slices, 115 MiB, one request", "200, within 300 MB",
                 lambda: summary(post(server, big_series, timeout=300))),
                ("4 concurrent 115 MiB requests", "200 (2 at a time)",
                 lambda: concurrently([lambda: summary(post(server, big_series, timeout=600)) for _ in range(4)])),
            ]

        def fairness() -> str:
            large: dict = {}
            worker = threading.Thread(target=lambda: large.update(
                r=post(server, [(f"f{i}.dcm", slice_512[i % 4]) for i in range(64)], heatmap=True, timeout=300)))
            worker.start()
            time.sleep(1.0)
            start = time.perf_counter()
            small = post(server, one, heatmap=True)
            waited = time.perf_counter() - start
            worker.join()
            return f"{small.status_code}: one slice answered in {waited:.2f} s during a 64-slice heatmap request"

        server.measure(lambda: summary(post(server, one, heatmap=True)))  # Grad-CAM traces on its first call
        alone = server.measure(lambda: summary(post(server, one, heatmap=True)))[2]
        cases.append(("one slice behind 64 slices with heatmaps", f"near alone ({alone:.2f} s)", fairness))
        rows = []
        for name, expected, case in cases:
            outcome, memory, seconds = server.measure(case)
            rows.append((name, expected, outcome, memory, seconds))
            print(f"{name}: {outcome} ({memory:.0f} MB, {seconds:.1f} s)", file=sys.stderr, flush=True)
        log = server.stop()
    print("| case | expected | outcome | server memory peak over before (MB) | time (s) |")
    print("|---|---|---|---|---|")
    for name, expected, outcome, memory, seconds in rows:
        print(f"| {name} | {expected} | {outcome} | {memory:.0f} | {seconds:.1f} |")
    tracebacks = log.count("Traceback")
    print(f"\nserver log: {len(log.splitlines())} lines, {tracebacks} traceback(s); "
          f"patient name in it: {'BENCH^PHANTOM' in log}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
