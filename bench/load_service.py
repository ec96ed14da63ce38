"""Load test of the triage service on loopback: concurrent clients, latency percentiles, errors.

Usage: python bench/load_service.py RUN_DIR [--clients 8] [--requests 1000] [--no-heatmap]
                                    [--record none|store|store+uploads]
Starts `ichedge serve` on a free loopback port with the run's int8 export, then CLIENTS threads
post one bundled CT-ICH slice each to /api/predict until REQUESTS are done. Prints throughput,
p50/p95/max latency and the error count. ``--record`` is what the service keeps: nothing
(--no-record), the store (SQLite in a temporary home: the audit record and the decisions), or
the store and the de-identified uploads (the default of `ichedge serve`). A benchmark, not a
test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from ichedge.data import bundled_path


RECORD = {"none": ["--no-record"], "store": ["--no-keep-uploads"], "store+uploads": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, metavar="RUN_DIR", help="a run folder with an int8 export (ichedge export)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=1000, help="requests in all (default: %(default)s)")
    ap.add_argument("--no-heatmap", action="store_true", help="ask for probabilities only (?heatmap=false)")
    ap.add_argument("--record", choices=tuple(RECORD), default="store+uploads",
                    help="what the service keeps (default: %(default)s, as `ichedge serve`)")
    args = ap.parse_args(argv)

    port = free_port()
    home = tempfile.mkdtemp(prefix="ichedge-load-")  # no tokens; the store and uploads, as in use, but here
    server = subprocess.Popen([sys.executable, "-m", "ichedge.cli", "serve", "--model", str(args.run), "--port", str(port),
                               *RECORD[args.record]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "ICHEDGE_HOME": home})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                info = httpx.get(url + "/api/health").json()["model"]
                break
            except httpx.TransportError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the service did not start")
                time.sleep(0.5)
        images = sorted((bundled_path() / "brain").glob("*.jpg"))[:200]
        payloads = [(p.name, p.read_bytes()) for p in images]
        endpoint = url + "/api/predict" + ("?heatmap=false" if args.no_heatmap else "")
        latencies: list[float] = []
        errors: list[str] = []
        counter = iter(range(args.requests))
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    name, data = payloads[i % len(payloads)]
                    start = time.perf_counter()
                    try:
                        r = http.post(endpoint, files={"files": (name, data, "image/jpeg")})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 1
                    except httpx.HTTPError as exc:
                        ok, r = False, exc
                    elapsed = time.perf_counter() - start
                    with lock:
                        latencies.append(elapsed)
                        if not ok:
                            errors.append(str(getattr(r, "status_code", r)))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        ms = np.array(latencies) * 1000
        print(f"model {info['kind']} id {info['id']}; heatmaps {'off' if args.no_heatmap else 'on' if info['heatmaps'] else 'unavailable'}"
              f"; kept: {args.record}")
        print(f"{len(latencies)} requests, {args.clients} clients, {wall:.1f} s: {len(latencies) / wall:.1f} requests/s")
        print(f"latency ms: mean {ms.mean():.1f}, p50 {np.percentile(ms, 50):.1f}, p95 {np.percentile(ms, 95):.1f}, "
              f"max {ms.max():.1f}")
        print(f"errors: {len(errors)}" + (f" ({', '.join(sorted(set(errors)))})" if errors else ""))
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
