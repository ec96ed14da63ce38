"""The device table of docs/edge.md: for three common targets, the best model `ichedge tune` found
within its RAM and flash, beside the best of the paper's five configurations that fits it.

    python bench/device_table.py SEARCH_FOLDER [SEARCH_FOLDER ...]

Reads each search folder's trials.csv (several searches pool their trials: a trial that fits a
target counts whatever budget its search had). Latency is the MCU estimate of the target's core
(ichedge.devices.MCUS), not a measurement.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ichedge.devices import MCUS, Budget, parse_bytes
from ichedge.sweep import PAPER_MEASURED
from ichedge.tune import TRIALS, best_trial

TARGETS = (
    ("256KiB", "1MiB", "cortex-m4", "Arduino Nano 33 BLE Sense (nRF52840, Cortex-M4F 64 MHz, 256 KB RAM, 1 MB flash)"),
    ("320KiB", "1MiB", "cortex-m7", "32F746G-DISCOVERY (STM32F746, Cortex-M7 216 MHz, 320 KB RAM, 1 MB flash)"),
    ("512KiB", "2MiB", "cortex-m7", "NUCLEO-F767ZI (STM32F767, Cortex-M7 216 MHz, 512 KB RAM, 2 MB flash)"),
)
NUMBERS = ("auc_int8", "auc_int8_sd", "pooled_auc_int8", "pooled_auc_int8_low", "pooled_auc_int8_high", "arena_kib",
           "flash_kib", "macs", "collapsed_folds", "folds")


def read_trials(folder: Path) -> list[dict]:
    rows = []
    with (folder / f"{TRIALS}.csv").open() as fh:
        for r in csv.DictReader(fh):
            for k in NUMBERS:
                r[k] = float(r[k].replace(",", "")) if r[k] else None
            r["size"], r["alpha"] = int(r["size"]), float(r["alpha"])
            r["search"] = folder.name
            rows.append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("searches", nargs="+", type=Path)
    args = parser.parse_args()
    rows = [r for folder in args.searches for r in read_trials(folder)]
    print("| target (example board) | best found | int8 AUC, 5 folds (pooled, 95% CI) | arena KiB | flash KiB | "
          "MMACs | est. ms | best paper configuration that fits (ichedge, float AUC) |")
    print("|---|---|---|---|---|---|---|---|")
    for ram, flash, core, board in TARGETS:
        budget = Budget(parse_bytes(ram), parse_bytes(flash), mcu=MCUS[core])
        best = best_trial(rows, budget)
        fits = [(m["auc"], f"{s}x{s} a{a:g}") for (s, a), m in PAPER_MEASURED.items()
                if m["arena_kib"] * 1024 <= budget.ram and m["flash_kib"] * 1024 <= budget.flash]
        paper = "{1}: {0:.3f}".format(*max(fits)) if fits else "none fits"
        if best is None:
            print(f"| {ram} / {flash}: {board} | none found | | | | | | {paper} |")
            continue
        config = (f"{best['size']}x{best['size']} a{best['alpha']:g} {best['head']}{' trimmed' if best['trim'] == 'True' else ''}"
                  f" {best['channels']} {best['recipe']} (trial {best['trial']} of {best['search']})")
        pooled = (f" ({best['pooled_auc_int8']:.3f}, {best['pooled_auc_int8_low']:.3f}-{best['pooled_auc_int8_high']:.3f})"
                  if best["pooled_auc_int8"] is not None else "")
        print(f"| {ram} / {flash}: {board} | {config} | {best['auc_int8']:.3f} ± {best['auc_int8_sd']:.3f}{pooled} | "
              f"{best['arena_kib']:.1f} | {best['flash_kib']:.1f} | {best['macs'] / 1e6:.1f} | "
              f"{budget.mcu.latency_ms(int(best['macs'])):.0f} | {paper} |")


if __name__ == "__main__":
    main()
