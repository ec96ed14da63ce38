"""Does readers' feedback on a few local patients with bleeds measurably move a CT-ICH model on a
site it has not seen?

The champion is a run trained on CT-ICH only. In each repeat r, `--patients` patients of
PHE-SICH-CT-IDS (every one with a bleed; slices labelled one by one), drawn with numpy's
default_rng(seed + r), play the local site; the other PHE patients are the held-out site. The
real loop runs on them: `ichedge serve`'s app (the champion's int8 export, a fresh SQLite store,
uploads kept) scores each local patient's slices as one study, a reader posts a slice-level
verdict on every scored slice from the ground truth (confirm when the flag equals the label,
else reject), `export_feedback` writes the dataset, and `retrain` with holdout 0 (every feedback
study is learned from) trains the challenger with the champion's recipe on its training patients
plus the feedback, thresholds it on the champion's CT-ICH validation patients and compares both
on CT-ICH's held-out test patients (did the home site pay for the new one?). Both Keras models
are then scored on the held-out PHE patients, with the quality gate as `ichedge evaluate`:
slice AUC, sensitivity and specificity at each model's own threshold with patient-bootstrap 95%
intervals, and the paired challenger-minus-champion difference (AUC and sensitivity; the same
patient draws for both). The study level is not measured: PHE has no patient without a bleed.

Usage: python bench/feedback_site.py CHAMPION [--phe PHE_LABELS] [--patients 10] [--repeats 3] [--seed 0]
CHAMPION is a run folder trained on CT-ICH and exported, e.g. `ichedge train --size 160 --alpha
0.35`, then `ichedge export RUN`. PHE-SICH-CT-IDS is for non-commercial use: it is read from where
it lies; the uploads, the exported feedback and the challengers trained on them live in a
temporary folder deleted at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from ichedge.data import Dataset, read_dataset
from ichedge.evaluation import bootstrap_ci, paired_difference
from ichedge.feedback import export_feedback
from ichedge.preprocess import load_inputs, patient_groups
from ichedge.retrain import retrain
from ichedge.runtimes import KerasPredictor
from ichedge.service import create_app
from ichedge.store import Store

DEFAULT_PHE = "../shared/data/phe-sich/labels.csv"
LOCAL = "http://127.0.0.1"  # the service's allowed host on loopback
N_BOOT = 1000


def post_feedback(client: TestClient, ds: Dataset, patient: str) -> dict[str, int]:
    """Upload one patient's slices as a study, in slice order, and post the ground truth's verdict
    on every slice the service scored; counts of what happened."""
    records = sorted((r for r in ds.records if r.patient == patient), key=lambda r: r.slice)
    truth = {r.path.name: bool(r.label) for r in records}
    files = [("files", (r.path.name, r.path.read_bytes(), "image/jpeg")) for r in records]
    answer = client.post("/api/studies", files=files, data={"study": f"local {patient}"})
    if answer.status_code != 200:
        raise RuntimeError(f"patient {patient}: /api/studies answered {answer.status_code}: {answer.text}")
    (study,) = answer.json()["studies"]
    counts = {"uploaded": len(records), "scored": len(study["ranking"]), "confirm": 0, "reject": 0}
    for s in study["ranking"]:
        verdict = "confirm" if s["flagged"] == truth[s["file"]] else "reject"
        body = {"prediction": study["prediction"], "slice": s["slice_hash"], "verdict": verdict}
        posted = client.post("/api/feedback", json=body)
        if posted.status_code != 200:
            raise RuntimeError(f"patient {patient}: /api/feedback answered {posted.status_code}: {posted.text}")
        counts[verdict] += 1
    return counts


def ci(entry: dict) -> str:
    """'0.864 [0.812, 0.905]' from a bootstrap_ci entry."""
    return f"{entry['value']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def diff(entry: dict) -> str:
    """'+0.012 [-0.010, +0.031]' from a paired_difference entry."""
    return f"{entry['difference']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]"


def repeat(r: int, args: argparse.Namespace, ds: Dataset, y: np.ndarray, groups: np.ndarray, x: np.ndarray,
           p_champion: np.ndarray, t_champion: float) -> dict:
    """One draw of local patients through the loop; prints its tables and returns its figures."""
    start = time.perf_counter()
    patients = np.unique(groups)
    local = np.random.default_rng(args.seed + r).choice(patients, args.patients, replace=False)
    with tempfile.TemporaryDirectory(prefix="ichedge-feedback-site-") as tmp:
        tmp = Path(tmp)
        store = Store(tmp / "store.db")
        client = TestClient(create_app(args.champion, explain=False, store=store, keep_uploads=tmp / "uploads"),
                            base_url=LOCAL)
        counts = [post_feedback(client, ds, str(patient)) for patient in sorted(local)]
        exported = export_feedback(store, tmp / "uploads", tmp / "exports")
        done = retrain(args.champion, [exported.path / "labels.csv"], tmp / "runs", store=store, holdout=0.0,
                       n_boot=N_BOOT, seed=args.seed + r)
        store.close()
        challenger = KerasPredictor.open(done.challenger)
        held = ~np.isin(groups, local)
        p_challenger = challenger.predict(x[held])
    t_challenger = challenger.decision.slice_threshold
    yh, gh, ph = y[held], groups[held], p_champion[held]
    site = {"champion": bootstrap_ci(yh, ph, gh, t_champion, N_BOOT, args.seed + r),
            "challenger": bootstrap_ci(yh, p_challenger, gh, t_challenger, N_BOOT, args.seed + r)}
    paired = paired_difference(yh, ph, p_challenger, gh, t_champion, t_challenger, N_BOOT, args.seed + r)
    home = done.comparison["sets"]["held-out patients"]
    seconds = time.perf_counter() - start

    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    print(f"\n## Repeat {r} (seed {args.seed + r}): local patients {', '.join(sorted(map(str, local)))}\n")
    print(f"feedback: {total['uploaded']} slices uploaded, {total['scored']} scored (the rest refused by the quality "
          f"gate); {total['confirm']} confirmed, {total['reject']} rejected; exported {exported.rows} slices of "
          f"{exported.studies} studies ({exported.positives} with a bleed); challenger learned from "
          f"{done.comparison['feedback']['slices_learned']} slices")
    print(f"held-out site: {len(np.unique(gh))} PHE patients, {len(yh)} slices ({int(yh.sum())} with a bleed)\n")
    print("| model | slice threshold | slice AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |")
    print("|---|---|---|---|---|")
    for name, t in (("champion", t_champion), ("challenger", t_challenger)):
        m = site[name]
        print(f"| {name} | {t:.4f} | {ci(m['auc'])} | {ci(m['sensitivity'])} | {ci(m['specificity'])} |")
    spec_change = site["challenger"]["specificity"]["value"] - site["champion"]["specificity"]["value"]
    print(f"| challenger - champion (paired) | | {diff(paired['auc'])} | {diff(paired['sensitivity'])} | "
          f"{spec_change:+.3f} (point) |")
    print(f"\nCT-ICH held-out test patients ({home['patients']} patients, {home['slices']} slices, "
          f"{home['bleeds']} with a bleed; retrain's comparison): AUC {home['auc']['a']:.3f} -> {home['auc']['b']:.3f} "
          f"({diff(home['auc'])}), sensitivity {home['sensitivity']['a']:.3f} -> {home['sensitivity']['b']:.3f} "
          f"({diff(home['sensitivity'])})")
    print(f"promoted: {'yes' if done.promoted else 'no'}" + (f" ({'; '.join(done.reasons)})" if done.reasons else ""))
    print(f"wall time: {seconds:.0f} s")
    return {"site": site, "paired": paired, "home": home, "promoted": done.promoted, "seconds": seconds}


def summary(results: list[dict]) -> None:
    """Means over repeats: champion, challenger and the change, on each site."""
    mean = lambda f: np.mean([f(res) for res in results])  # noqa: E731
    print(f"\n## Mean over {len(results)} repeat(s)\n")
    print("| measure | champion | challenger | challenger - champion |")
    print("|---|---|---|---|")
    for metric in ("auc", "sensitivity", "specificity"):
        a = mean(lambda res: res["site"]["champion"][metric]["value"])
        b = mean(lambda res: res["site"]["challenger"][metric]["value"])
        print(f"| held-out PHE slice {metric} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    for metric in ("auc", "sensitivity"):
        a, b = mean(lambda res: res["home"][metric]["a"]), mean(lambda res: res["home"][metric]["b"])
        print(f"| CT-ICH test slice {metric} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    moved = sum(res["paired"]["auc"]["low"] > 0 for res in results)
    print(f"\nrepeats whose paired 95% CI of the PHE AUC change lies above 0: {moved} of {len(results)}; "
          f"promoted: {sum(res['promoted'] for res in results)} of {len(results)}; "
          f"mean wall time per repeat: {mean(lambda res: res['seconds']):.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("champion", type=Path, metavar="CHAMPION", help="an exported run folder trained on CT-ICH")
    ap.add_argument("--phe", default=DEFAULT_PHE, help=f"the second hospital's labels.csv (default: {DEFAULT_PHE})")
    ap.add_argument("--patients", type=int, default=10, help="local PHE patients whose feedback is learned from")
    ap.add_argument("--repeats", type=int, default=3, help="draws of local patients (seeds SEED, SEED+1, ...)")
    ap.add_argument("--seed", type=int, default=0, help="the first draw's seed")
    args = ap.parse_args(argv)

    champion = KerasPredictor.open(args.champion)
    t_champion = champion.decision.slice_threshold
    ds = read_dataset(args.phe, champion.preprocessing.windows)
    print(ds.summary())
    logging.getLogger("ichedge.preprocess").setLevel(logging.ERROR)  # the gate's refusals: counted below, not listed
    # every PHE slice once, gated as `ichedge evaluate` gates; each repeat scores its held-out patients
    inputs = load_inputs(ds, champion.preprocessing, check=True)
    y, groups = inputs.y, patient_groups(ds, inputs)
    print(f"{len(inputs.errors)} slices refused by the quality gate, {len(y)} scored; champion "
          f"{args.champion.name}, slice threshold {t_champion:.4f}")
    p_champion = champion.predict(inputs.x)
    results = [repeat(r, args, ds, y, groups, inputs.x, p_champion, t_champion) for r in range(args.repeats)]
    summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
