"""Self-contained HTML reports: one file, plots embedded, no network, opens in any browser.

Every training run, sweep, evaluation and audit writes ``report.html`` beside its other files.
Warnings that make a number untrustworthy (an image-level split, training images in an
evaluation, near twins across a split) are shown as a banner at the top, not in a footnote.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ichedge import __version__
from ichedge.runs import CARD_MARKDOWN, EXPORT, NEAR_DUPLICATES, PLOTS, REPORT

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1rem 1.5rem;color:#1d2330}
h1{font-size:1.5rem}h2{font-size:1.15rem;border-bottom:1px solid #dde1e8;padding-bottom:.2rem;margin-top:1.6rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #dde1e8;padding:.25rem .5rem;text-align:left}
th{background:#f0f2f6}.banner{background:#fde8e8;border-left:5px solid #c62828;padding:.6rem .9rem;margin:.5rem 0;font-weight:600}
.note{background:#fff4d6;border-left:5px solid #e0a800;padding:.5rem .9rem;margin:.5rem 0}
.plots{display:flex;flex-wrap:wrap;gap:1rem}.plots figure{margin:0}.plots img{max-width:480px}
figcaption{font-size:.8rem;color:#555}pre{background:#f6f7f9;padding:.6rem;overflow:auto;font-size:.8rem}
footer{margin-top:2rem;font-size:.8rem;color:#555}
"""


@dataclass
class Report:
    """A report built section by section, then written as one HTML file."""

    title: str
    banners: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, cls: str = "") -> None:
        attr = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{attr}>{html.escape(text)}</p>")

    def link(self, text: str, href: str) -> None:
        self.parts.append(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>')

    def table(self, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> None:
        if not rows:
            self.paragraph("(nothing to show)")
            return
        cols = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                       for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def key_values(self, values: Mapping[str, object]) -> None:
        self.table([{"": k, "value": v} for k, v in values.items()], ["", "value"])

    def plots(self, paths: Sequence[Path]) -> None:
        figures = []
        for p in paths:
            if Path(p).is_file():
                data = base64.b64encode(Path(p).read_bytes()).decode()
                figures.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(Path(p).stem)}">'
                               f"<figcaption>{html.escape(Path(p).name)}</figcaption></figure>")
        if figures:
            self.parts.append('<div class="plots">' + "".join(figures) + "</div>")

    def code(self, obj: object) -> None:
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str)
        self.parts.append(f"<pre>{html.escape(text)}</pre>")

    def write(self, path: Path, credit: str = "") -> Path:
        banners = "".join(f'<div class="banner">{html.escape(b)}</div>' for b in self.banners)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        credit_html = f"<p>Data credit: {html.escape(credit)}</p>" if credit else ""
        doc = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(self.title)}</title>"
               f"<style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>{banners}"
               f"{''.join(self.parts)}<footer>{credit_html}<p>ichedge {__version__}, {stamp}. Research use only; "
               f"not a medical device.</p></footer></body></html>")
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(doc, encoding="utf-8")
        tmp.replace(path)
        return path


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def interval(ci: Mapping[str, float]) -> str:
    """'0.864 (0.812-0.905)' from a bootstrap_ci entry."""
    return f"{ci['value']:.3f} ({ci['low']:.3f}-{ci['high']:.3f})"


# --- the reports ichedge writes ----------------------------------------------------------------

POINT_NAMES = {"default": "threshold 0.5", "high_sensitivity": "high-sensitivity threshold (chosen on validation)",
               "study_high_sensitivity": "study level (patients)",
               "context_default": "slice context, threshold 0.5",
               "context_high_sensitivity": "slice context, high-sensitivity threshold (chosen on validation)",
               "context_study_high_sensitivity": "slice context, study level (patients)"}


def split_banners(meta: dict) -> list[str]:
    """What makes a run's numbers untrustworthy, said loudly."""
    out = []
    if not str(meta["dataset"].get("split_by", "patient")).startswith("patient"):
        out.append(f"Split: {meta['dataset']['split_by']}. Slices of one patient can sit in training and test: "
                   "every metric below is likely inflated.")
    if "warning" in meta:
        out.append(meta["warning"])
    return out


def metric_rows(metrics: dict) -> list[dict]:
    rows = []
    for point, name in POINT_NAMES.items():
        m = metrics.get(point)
        if not m:
            continue
        ci = metrics.get("context_intervals" if point.startswith("context_") else "intervals", {})
        key = point.removeprefix("context_")
        row = {"operating point": name, "threshold": m["threshold"], "n": m["n"]}
        for k in ("auc", "sensitivity", "specificity", "ppv", "npv", "accuracy"):
            row[k] = interval(ci[key][k]) if key in ci else f"{m[k]:.3f}"
        rows.append(row)
    return rows


def source_tables(r: Report, metrics: dict) -> None:
    """The same figures for each source (hospital) where the data has several, at the same thresholds."""
    for name, m in metrics.get("by_source", {}).items():
        r.heading(f"Source: {name}")
        r.table(metric_rows(m))


def write_run_report(folder: Path, meta: dict, metrics: dict) -> Path:
    """report.html of one training run."""
    c = meta["config"]
    # The folder still has its temporary name here: title by configuration and time instead.
    r = Report(f"Run {meta['created']}: MobileNetV2 alpha {c['alpha']:g}, {c['size']}x{c['size']}, {c['channels']}",
               banners=split_banners(meta))
    r.heading("Test results (held-out patients)")
    ci = metrics.get("intervals", {})
    r.paragraph(f"Intervals: 95% bootstrap, resampling {ci.get('resampled', 'patients')} ({ci.get('n_boot', '')} draws). "
                "Thresholds are chosen on the validation split, never on test.")
    r.table(metric_rows(metrics))
    source_tables(r, metrics)
    if "context_skipped" in metrics:
        r.paragraph(f"Slice context was asked for and skipped: {metrics['context_skipped']['reason']}.")
    if "calibration" in metrics:
        cal = metrics["calibration"]
        r.paragraph(f"Calibration: ECE {cal['ece']:.3f} as output; {cal['ece_after_temperature']:.3f} after temperature "
                    f"scaling (T = {cal['temperature']:.2f}, fitted on validation; reported, not applied).")
    r.plots(sorted((folder / PLOTS).glob("*.png")))
    r.heading("Data and split")
    r.key_values({"dataset": meta["dataset"]["summary"],
                  **{f"source {t['name']}": f"{t['data']}, licence {t['licence']}" for t in meta["dataset"].get("sources", [])},
                  "split by": meta["dataset"]["split_by"],
                  "sizes": meta["dataset"]["sizes"], "skipped images": len(meta["dataset"]["skipped_images"]),
                  "weights": f"{meta['weights']['source']} {meta['weights'].get('note', '')}"})
    r.heading("Configuration")
    r.code({"config": c, "preprocessing": meta["preprocessing"]})
    r.link(f"model card (after `ichedge export`; later exports are {EXPORT}-2, {EXPORT}-3, ...)",
           f"{EXPORT}/{CARD_MARKDOWN}")
    return r.write(folder / REPORT, meta["dataset"].get("credit", ""))


def write_sweep_report(folder: Path, rows: list[dict], notes: list[str], dataset, runs: list[list[str]]) -> Path:
    """report.html of a sweep: the paper-style table, how to read it, and links to every run's report."""
    r = Report(f"Sweep: {dataset.summary()}")
    if dataset.split_unit == "image":
        r.banners.append("No patient IDs: the folds are split by image, so one patient's slices can be in training "
                         "and test. These numbers are likely inflated.")
    elif dataset.split_unit != "patient":
        r.banners.append("No patient IDs: the folds keep near-duplicate clusters together, not patients, so one "
                         "patient's slices can still be in training and test. These numbers may be inflated.")
    r.paragraph(" ".join(n for n in notes if n))
    r.table(rows)
    r.heading("Runs")
    for names in runs:
        for name in names:
            r.link(f"{name}: report", f"{name}/{REPORT}")
    return r.write(folder / REPORT, dataset.credit)


def write_audit_report(folder: Path, dataset, result) -> Path:
    """report.html of a leakage audit."""
    r = Report(f"Leakage audit: {dataset.name}")
    leaks = result.split_leaks or {}
    if leaks.get("test_with_train_twin"):
        r.banners.append(f"{leaks['test_with_train_twin']} of {leaks['test']} test images have a near twin in training.")
    if not dataset.has_patients:
        r.banners.append("No patient IDs: splits are by image. Group by near-duplicate clusters "
                         "(--group-by-near-duplicates) at least, or find the patient IDs.")
    r.paragraph(result.summary())
    r.heading("Near-duplicate pairs (closest first, up to 50)")
    order = np.argsort(result.pairs[:, 2], kind="stable")[:50] if len(result.pairs) else []
    r.table([{"file a": dataset.records[int(result.pairs[k, 0])].path.name,
              "file b": dataset.records[int(result.pairs[k, 1])].path.name,
              "distance": int(result.pairs[k, 2])} for k in order])
    r.link(f"all pairs: {NEAR_DUPLICATES}", NEAR_DUPLICATES)
    return r.write(folder / REPORT, dataset.credit)
