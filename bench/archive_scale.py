"""Archive-scale triage: the local engine against Ray with 1 and 2 workers on a 10,000-slice archive.

Usage: python bench/archive_scale.py MODEL [--slices 10000] [--phe PHE_LABELS] [--workers 1 2]
Builds an archive of symbolic links in a temporary folder: CT-ICH's bundled slices and
PHE-SICH-CT-IDS's (read where they lie; non-commercial) repeated under new study folders until
SLICES, one folder per patient and repeat. Then runs `ichedge predict ARCHIVE --model MODEL
--no-record` with `--engine local` and with `--engine ray --workers N`, each in a fresh process,
and prints wall time, throughput, the peak memory of the whole process tree (the driver and,
for Ray, its raylet and workers: RSS summed over /proc every 0.2 s) and whether the worklist and
slice tables are identical to the local engine's. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ichedge.data import bundled_path

DEFAULT_PHE = "../shared/data/phe-sich/labels.csv"


def build_archive(root: Path, slices: int, phe: Path) -> int:
    """Folders of links, patient by patient (CT-ICH, then PHE-SICH), repeated until ``slices``."""
    patients: dict[str, list[Path]] = {}
    for p in sorted((bundled_path() / "brain").glob("*.jpg")):
        patients.setdefault(f"ctich-{p.name.split('_')[0]}", []).append(p)
    with phe.open() as fh:
        for row in csv.DictReader(fh):
            patients.setdefault(f"phe-{row['patient']}", []).append(phe.parent / row["image"])
    made, repeat = 0, 0
    while made < slices:
        for name, files in patients.items():
            folder = root / f"r{repeat:02d}-{name}"
            folder.mkdir()
            for f in files[:slices - made]:
                (folder / f.name).symlink_to(f.resolve())
            made += min(len(files), slices - made)
            if made >= slices:
                break
        repeat += 1
    return made


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        children.setdefault(int(fields["PPid"]), []).append(int(entry))
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def run(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak tree memory of a command."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err[-2000:]}")
    return time.perf_counter() - started, peak[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an exported int8 .tflite (or a run folder)")
    ap.add_argument("--slices", type=int, default=10_000)
    ap.add_argument("--phe", type=Path, default=Path(DEFAULT_PHE))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ichedge-archive-") as tmp:
        archive = Path(tmp) / "archive"
        archive.mkdir()
        n = build_archive(archive, args.slices, args.phe)
        folders = len(list(archive.iterdir()))
        print(f"archive: {n} slices in {folders} study folders (links to CT-ICH and PHE-SICH-CT-IDS)")
        base = [sys.executable, "-m", "ichedge.cli", "predict", str(archive), "--model", str(args.model),
                "--no-record", "--quiet"]
        runs = [("local", [])] + [(f"ray, {w} worker(s)", ["--engine", "ray", "--workers", str(w)]) for w in args.workers]
        results, reference = [], None
        print("| engine | wall (s) | slices/s | speed-up | peak memory (GB) | worklist and slices identical |")
        print("|---|---|---|---|---|---|")
        for k, (name, extra) in enumerate(runs):
            out = Path(tmp) / f"out{k}"
            seconds, peak = run(base + extra + ["--out", str(out)])
            (folder,) = out.glob("*-predict")
            tables = [(folder / t).read_bytes() for t in ("worklist.csv", "slices.csv")]
            reference = reference or tables
            speed = n / seconds
            results.append(speed)
            print(f"| {name} | {seconds:.1f} | {speed:.1f} | {speed / results[0]:.2f}x | {peak / 1e9:.2f} | "
                  f"{'yes' if tables == reference else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
