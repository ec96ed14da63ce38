"""The `ichedge` commands: parse arguments and call the Python API, nothing else.

:mod:`ichedge.cli` imports this module once output is configured (it loads TensorFlow).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import keras
from tqdm.auto import tqdm

from ichedge.access import TokenStore, allowed_hosts, check_exposure, deid_key_file, tokens_file
from ichedge.acceptance import DEFAULT_CONFIDENCE, DEFAULT_SENSITIVITY, DEFAULT_SITE, calibrate_site, format_calibration
from ichedge.audit import DEFAULT_MAX_DISTANCE, audit, group_by_clusters, run_audit
from ichedge.channels import CHANNEL_MODES
from ichedge.crosssite import cross_site, markdown, write_cross_site
from ichedge.devices import MCUS, Budget, mcu, parse_bytes
from ichedge.distill import DistillConfig, distill
from ichedge.data import DataError, Dataset, read_dataset, train_val_test_split
from ichedge.evaluate import evaluate_model
from ichedge.explain import GradCAM
from ichedge.feedback import export_feedback
from ichedge.export import export_run
from ichedge.heads import HEADS
from ichedge.intake import gather_sources, prepare_sources
from ichedge.monitoring import format_monitor, monitor
from ichedge.output import progress_wanted
from ichedge.profiling import format_profile, profile_run
from ichedge.report import interval
from ichedge.retrain import Gate, retrain
from ichedge.runs import (COMPARISON_REPORT, FEATURE_CACHE, NEAR_DUPLICATES, PREDICT_PARTS, REPORT, RESULTS, WORKLIST,
                          ExportFolder, RunFolder, keras_model_file)
from ichedge.runtimes import Predictor
from ichedge.scale import ENGINES, RayEngine, RayExecutor, cached, predict_archive
from ichedge.service import BACKENDS, MIB, Access, Limits, serve
from ichedge.studies import AGGREGATES
from ichedge.store import Store, default_uploads, default_url
from ichedge.sweep import PAPER_GRID, parse_grid, run_sweep
from ichedge.tflm import TFLMError
from ichedge.training import TrainConfig, compute_features, train
from ichedge.triage import OUTSIDE, record_batch, triage, write_triage
from ichedge.tune import PRETRAINED_RECIPES, RANDOM_RECIPES, Space, describe, tune


def _config_args(p: argparse.ArgumentParser, single: bool) -> None:
    d = TrainConfig()
    p.add_argument("--data", type=Path, action="append",
                   help="CSV manifest, folder with labels.csv, or class folders (default: bundled CT-ICH); give it "
                        "again to train on several sources (patients namespaced by source, splits stratified by it)")
    if single:
        p.add_argument("--size", type=int, default=d.size, help="input resolution rho (square)")
        p.add_argument("--alpha", type=float, default=d.alpha, help="MobileNetV2 width multiplier")
    p.add_argument("--channels", choices=CHANNEL_MODES.names(), default=d.channels,
                   help="; ".join(f"{m.name}: {m.help}" for m in CHANNEL_MODES))
    p.add_argument("--no-crop", dest="crop", action="store_false", help="keep the full frame (default: crop to the head)")
    p.add_argument("--trim", action="store_true",
                   help="drop the backbone's last 1x1 conv (1280 channels): about a third smaller at alpha 0.35")
    p.add_argument("--head", choices=HEADS.names(), default=d.head,
                   help="; ".join(f"{head.name}: {head.help}" for head in HEADS))
    p.add_argument("--neurons", type=int, default=d.neurons)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs)
    p.add_argument("--fine-tune-lr", type=float, default=d.fine_tune_lr)
    p.add_argument("--fine-tune-from", default=d.fine_tune_from, help="first backbone layer (name prefix) to unfreeze")
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--no-class-weight", dest="class_weight", action="store_false")
    p.add_argument("--weights", default=d.weights, help="'imagenet', 'random' or a Keras no-top weights file")
    p.add_argument("--target-sensitivity", type=float, default=d.target_sensitivity)
    p.add_argument("--study-aggregate", default=d.study_aggregate, choices=AGGREGATES,
                   help="slice probabilities to a study score (measured choice: top3, mean of the 3 highest)")
    p.add_argument("--context", action="store_true",
                   help="also fit and evaluate a slice-context model (neighbouring slices, study, position; "
                        "needs patient IDs and slice numbers)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--runs", type=Path, default=Path("runs"), help="folder that receives new run folders")
    p.add_argument("--quiet", action="store_true", help="no progress bars (drawn only on a terminal anyway)")
    _grouping_args(p)


def _grouping_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-by", choices=("patient", "slice"), default="patient",
                   help="slice: ignore patient IDs (leaks patients; only to measure how much that inflates)")
    p.add_argument("--group-by-near-duplicates", action="store_true",
                   help="no patient IDs: keep near-duplicate clusters together in splits (pHash; see `ichedge audit`)")


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})


def _dataset(args: argparse.Namespace, config: TrainConfig) -> Dataset:
    ds = read_dataset(args.data, config.preprocessing.windows)
    print(ds.summary())
    for note in ds.notes:
        print(f"  skipped: {note}")
    return _grouped(ds, args)


def _grouped(ds: Dataset, args: argparse.Namespace) -> Dataset:
    """Apply --split-by slice or --group-by-near-duplicates, loudly."""
    if args.split_by == "slice":
        print("WARNING: SPLIT BY SLICE: patient IDs ignored, one patient's slices land in training and test; "
              "every metric will be inflated (use only to measure the leak)")
        return replace(ds, has_patients=False, name=ds.name + " [split by slice]")
    if args.group_by_near_duplicates:
        result = audit(ds)
        print(f"grouping by {len(set(result.clusters[result.clusters >= 0]))} near-duplicate clusters (not patients)")
        return group_by_clusters(ds, result.clusters)
    return ds


def cmd_train(args: argparse.Namespace) -> int:
    config = _config(args)
    ds = _dataset(args, config)
    split = train_val_test_split(ds, seed=config.seed)
    engine = RayEngine(args.workers, args.address) if args.engine == "ray" else None
    try:
        extract = compute_features if engine is None else cached(engine.extractor(config), config,
                                                                   args.runs / FEATURE_CACHE)
        run, result = train(config, ds, split, args.runs, progress=progress_wanted(args.quiet), extract=extract)
    finally:
        if engine is not None:
            engine.close()
    if not result.weights.pretrained:
        print(f"WARNING: RANDOM WEIGHTS: {result.weights.note}")
    d, hs = result.metrics["default"], result.metrics["high_sensitivity"]
    print(f"test ({d['n']} slices, unseen patients): loss {d['loss']:.3f}  accuracy {d['accuracy']:.3f}  AUC {d['auc']:.3f}")
    print(f"  at 0.5:   sensitivity {d['sensitivity']:.3f}  specificity {d['specificity']:.3f}")
    print(f"  at {hs['threshold']:.3f} (val sensitivity >= {config.target_sensitivity}): "
          f"sensitivity {hs['sensitivity']:.3f}  specificity {hs['specificity']:.3f}")
    if "study_high_sensitivity" in result.metrics:
        st = result.metrics["study_high_sensitivity"]
        print(f"  patients ({st['n']}, {config.study_aggregate} of slices, threshold {st['threshold']:.3f}): "
              f"AUC {st['auc']:.3f}  sensitivity {st['sensitivity']:.3f}  specificity {st['specificity']:.3f}")
    if "context_default" in result.metrics:
        c, chs = result.metrics["context_default"], result.metrics["context_high_sensitivity"]
        print(f"  slice context: AUC {c['auc']:.3f}; at {chs['threshold']:.3f} sensitivity {chs['sensitivity']:.3f}  "
              f"specificity {chs['specificity']:.3f}")
    elif "context_skipped" in result.metrics:
        print(f"WARNING: NO SLICE CONTEXT: {result.metrics['context_skipped']['reason']}")
    _print_sources(result.metrics)
    print(f"run folder: {run}")
    return 0


def _print_sources(metrics: dict) -> None:
    """One line per source where the data has several: the same thresholds, each site's figures."""
    for name, m in metrics.get("by_source", {}).items():
        d, hs = m["default"], m["high_sensitivity"]
        line = (f"  {name} ({d['n']} slices): AUC {d['auc']:.3f}; at {hs['threshold']:.3f} sensitivity "
                f"{hs['sensitivity']:.3f}  specificity {hs['specificity']:.3f}")
        if "study_high_sensitivity" in m:
            st = m["study_high_sensitivity"]
            line += f"; patients {st['n']}: sensitivity {st['sensitivity']:.3f}  specificity {st['specificity']:.3f}"
        print(line)


def cmd_sweep(args: argparse.Namespace) -> int:
    config = _config(args)
    grid = parse_grid(args.grid) if args.grid else list(PAPER_GRID)
    ds = _dataset(args, config)
    out, _ = run_sweep(config, ds, grid, folds=args.folds, seed=config.seed, runs_root=args.runs,
                       progress=progress_wanted(args.quiet), profile=args.profile)
    print((out / f"{RESULTS}.md").read_text())
    print(f"sweep folder: {out}")
    return 0


def _listed(text: str, kind: type) -> tuple:
    return tuple(kind(v) for v in text.split(",") if v.strip())


def cmd_tune(args: argparse.Namespace) -> int:
    budget = Budget(parse_bytes(args.ram), parse_bytes(args.flash), args.latency_ms, mcu(args.mcu, args.clock_mhz))
    try:
        low, high, step = (int(v) for v in args.sizes.split(":"))
    except ValueError:
        raise ValueError(f"--sizes {args.sizes!r} is not LOW:HIGH:STEP, e.g. 64:224:16") from None
    space = Space(low, high, step, _listed(args.alphas, float), _listed(args.heads, str),
                  (False, True) if args.trim == "search" else (args.trim == "yes",), _listed(args.channels, str),
                  _listed(args.recipes, str))
    windows = tuple(dict.fromkeys(w for name in space.channels for w in CHANNEL_MODES.get(name).windows))
    ds = _grouped(read_dataset(args.data, windows), args)
    print(ds.summary())
    base = TrainConfig(seed=args.seed, epochs=args.epochs)
    executor = RayExecutor(args.workers, args.address) if args.engine == "ray" else None
    try:
        result = tune(ds, budget, args.trials, space, base, args.folds, args.seed, args.runs, args.weights_dir,
                      executor=executor, apply=args.apply, resume=args.resume, progress=progress_wanted(args.quiet))
    finally:
        if executor is not None:
            executor.close()
    print(describe(result))
    print(f"search folder: {result.folder}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    ds = read_dataset(args.data)
    print(ds.summary())
    unlabelled = read_dataset(args.unlabelled) if args.unlabelled else None
    config = DistillConfig(alpha=args.alpha, size=args.size, epochs=args.epochs, seed=args.seed)
    run, result = distill(config, ds, train_val_test_split(ds, seed=args.seed), unlabelled, args.unlabelled_count,
                          args.runs, progress=progress_wanted(args.quiet))
    d, hs = result.metrics["default"], result.metrics["high_sensitivity"]
    print(f"student {args.size}x{args.size}, alpha {args.alpha:g}: test AUC {d['auc']:.3f}; at {hs['threshold']:.3f} "
          f"sensitivity {hs['sensitivity']:.3f}, specificity {hs['specificity']:.3f}")
    if unlabelled is not None:
        print(f"trained with {unlabelled.name} slices (teacher scores only): licence {unlabelled.licence}")
    print(f"run folder: {run}")
    return 0


def cmd_crosssite(args: argparse.Namespace) -> int:
    config = _config(args)
    home = _dataset(args, config)
    other = read_dataset(args.other, config.preprocessing.windows)
    print(other.summary())
    result = cross_site(config, home, other, folds=args.folds, seed=config.seed, progress=progress_wanted(args.quiet))
    folder = write_cross_site(args.runs, result)
    print(markdown(result))
    print(f"cross-site folder: {folder}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    result = export_run(args.run, calibration_images=args.calibration_images, site=args.site)
    for name, path in result.files.items():
        print(f"{name:>9}: {path} ({path.stat().st_size / 1024:.1f} KiB)")
    print(f"model card: {ExportFolder(result.folder).card_markdown}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    export = RunFolder.open(args.run).export(args.export)
    profile = profile_run(args.run, export.path, runs=args.runs_latency)
    print(format_profile(profile))
    print(f"profile: {export.profile_file}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    explain = "all" if args.explain_all else "flagged" if args.explain else "none"
    started = time.perf_counter()
    if args.engine == "ray":
        if explain != "none":
            raise ValueError("--explain needs the Keras model in this process: use --engine local")
        engine = RayEngine(args.workers, args.address)
        bar = tqdm(desc="series", unit="series", disable=not progress_wanted(args.quiet), leave=False)

        def advance(done: int, total: int) -> None:
            bar.total, bar.n = total, done
            bar.refresh()

        try:
            archive, predictor = predict_archive(args.paths, args.model, args.out, engine, site=args.site,
                                                 context=args.context, progress=advance)
        finally:
            bar.close()
            engine.close()
        result, digests, n_files, prepared = archive.result, archive.digests, archive.files, None
        print(f"{archive.units} series or image folders, {archive.resumed} done before ({args.out / PREDICT_PARTS}); "
              f"{args.workers} Ray worker(s), {time.perf_counter() - started:.1f} s")
    else:
        predictor = Predictor.load(args.model, site=args.site)
        explainer = None
        if explain != "none":
            explainer = GradCAM(keras.models.load_model(keras_model_file(args.model)))
        sources, missing = gather_sources(args.paths)
        prepared = prepare_sources(sources, predictor.preprocessing)
        prepared.errors[:0] = missing
        result = triage(prepared, predictor, explain, explainer, context=args.context)
        scored = set(prepared.files)
        digests, n_files = {s.name: s.digest for s in sources if s.name in scored}, len(sources) + len(missing)
    folder = write_triage(args.out, result, prepared, predictor, parquet=args.engine == "ray")
    if not args.no_record:
        store = Store(args.db)
        record_batch(store, predictor, result, digests, n_files=n_files,
                     latency_ms=1000 * (time.perf_counter() - started))
        print(f"recorded in {store.safe_url()}")
    print(f"{len(result.slices)} slice(s) in {len(result.studies)} stud(ies), {result.scoring} scores; slice threshold "
          f"{result.slice_threshold:.3f}, study: {predictor.decision.study_aggregate} of slices >= {result.study_threshold:.3f}"
          + (f" (site profile {predictor.decision.site})" if predictor.decision.site else ""))
    for rank, s in enumerate(result.studies[:SHOWN_STUDIES], 1):
        print(f"{rank:>3}. {'FLAG' if s.flagged else '    '} {s.score:.3f}  {s.study}  ({s.slices} slices)"
              + (f"  [{s.outside_slices} slice(s) {OUTSIDE}: read it yourself]" if s.outside_slices else ""))
    if len(result.studies) > SHOWN_STUDIES:
        print(f"  ... and {len(result.studies) - SHOWN_STUDIES} more studies in {WORKLIST}.csv")
    for e in result.errors:
        print(f"  skipped: {e}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"worklist: {folder / f'{WORKLIST}.csv'}")
    return 0 if result.slices or not result.errors else 2


SHOWN_STUDIES = 50  # the most urgent studies printed; an archive's worklist is in its files


def cmd_calibrate(args: argparse.Namespace) -> int:
    done = calibrate_site(args.model, args.data, args.site, args.sensitivity, args.confidence, args.backend,
                          seed=args.seed, progress=progress_wanted(args.quiet))
    model = done.profile["model"]
    print(f"site {args.site}: {model['file']} ({model['runtime']}) on {done.profile['sample']['data']}")
    print("\n".join(format_calibration(done.calibration)))
    print(f"site profile: {done.path}")
    print(f"use it: ichedge predict|serve --site {args.site} ..., or ichedge export --site {args.site} ...")
    return 0


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=default_url(),
                   help="the store: a SQLAlchemy URL (sqlite:///FILE, postgresql+psycopg://USER@HOST/DB) or a "
                        "SQLite file (default: %(default)s)")


def _site_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", help="use this site's thresholds (its newest profile from `ichedge calibrate`) instead "
                                  "of the validated ones")


def cmd_serve(args: argparse.Namespace) -> int:
    auth = bool(TokenStore(args.tokens).names())
    check_exposure(args.host, tls=args.certfile is not None, auth=auth, force=args.insecure_expose)
    limits = Limits(max_files=args.max_files, max_file_bytes=int(args.max_file_mb * MIB))
    access = Access(tokens=args.tokens if auth else None,
                    allowed_hosts=tuple(allowed_hosts(args.host, args.allowed_host)), tls=args.certfile is not None,
                    deid_key=deid_key_file())
    store = None if args.no_record else Store(args.db)
    keep = None if args.no_keep_uploads else args.keep_uploads or (default_uploads() if store else None)
    scheme = "https" if args.certfile else "http"
    print(f"ichedge triage on {scheme}://{args.host}:{args.port}/ (Ctrl-C stops it); "
          + (f"bearer tokens from {args.tokens}" if auth else "no tokens")
          + ("; no record kept" if store is None else f"; requests, decisions and feedback recorded in {store.safe_url()}")
          + ("" if keep is None else f"; de-identified uploads kept in {keep}"))
    serve(args.model, args.host, args.port, certfile=args.certfile, keyfile=args.keyfile, backend=args.backend,
          limits=limits, keep_uploads=keep, explain=not args.no_heatmaps, site=args.site, access=access, store=store)
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    store = Store(args.db)
    done = export_feedback(store, args.uploads, args.out)
    print(f"{done.rows} slice(s) of {done.studies} stud(ies), {done.positives} with a bleed, from {store.safe_url()}")
    for s in done.skipped:
        print(f"  skipped: {s}")
    print(f"dataset: {done.path} (use it with --data beside your other data)")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    store = None if args.no_record else Store(args.db)
    done = retrain(args.champion, args.data, args.runs, store=store, holdout=args.holdout,
                   gate=Gate(args.sensitivity_margin, args.auc_margin), seed=args.seed,
                   progress=progress_wanted(args.quiet))
    print((done.folder / COMPARISON_REPORT).read_text())
    print(f"challenger run: {done.challenger}\ncomparison: {done.folder}"
          + ("" if store is None else f"\ndecision recorded in {store.safe_url()}"))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    report = monitor(Store(args.db), args.model)
    print("\n".join(format_monitor(report)))
    return 1 if any(w["drift"] for w in report["weeks"]) else 0


def cmd_token(args: argparse.Namespace) -> int:
    store = TokenStore(args.tokens)
    if args.action != "list" and not args.name:
        raise ValueError(f"ichedge token {args.action} needs the token's NAME")
    if args.action == "create":
        token = store.create(args.name)
        print(f"token {args.name!r} (shown once; only its SHA-256 is kept in {args.tokens}):\n{token}")
    elif args.action == "revoke":
        if not store.revoke(args.name):
            raise ValueError(f"no token named {args.name!r} in {args.tokens}")
        print(f"token {args.name!r} revoked")
    else:
        for entry in store.names():
            print(f"{entry['name']}\tcreated {entry['created']}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    ds = _grouped(read_dataset(args.data), args)
    print(ds.summary())
    folder, result = run_audit(ds, args.runs, args.max_distance, args.seed)
    print(result.summary())
    for e in result.errors:
        print(f"  skipped: {e}")
    print(f"audit folder: {folder} ({NEAR_DUPLICATES}, {REPORT})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    folder, m = evaluate_model(args.model, args.data or None, args.runs, progress=progress_wanted(args.quiet),
                               unseen_only=args.unseen_only, localise_masks=not args.no_localisation)
    print(m["dataset"])
    ci = m["intervals"]
    print(f"AUC {interval(ci['default']['auc'])}  (95% CI, resampling {ci['resampled']})")
    for point in ("default", "high_sensitivity"):
        t = m[point]["threshold"]
        print(f"  at {t:.3f}: sensitivity {interval(ci[point]['sensitivity'])}  "
              f"specificity {interval(ci[point]['specificity'])}")
    if "study_high_sensitivity" in m:
        st = m["study_high_sensitivity"]
        print(f"  patients ({st['n']}): AUC {st['auc']:.3f}  sensitivity {st['sensitivity']:.3f}  "
              f"specificity {st['specificity']:.3f}")
    if "context_note" in m:
        print(f"note: {m['context_note']}")
    if "context_intervals" in m:
        ci = m["context_intervals"]
        print(f"slice context: AUC {interval(ci['default']['auc'])}")
        t = m["context_high_sensitivity"]["threshold"]
        print(f"  at {t:.3f}: sensitivity {interval(ci['high_sensitivity']['sensitivity'])}  "
              f"specificity {interval(ci['high_sensitivity']['specificity'])}")
    _print_sources(m)
    if "localisation" in m:
        loc = m["localisation"]
        print(f"Grad-CAM on {loc['n_slices']} masked positive slices: pointing game "
              f"{interval(loc['summary']['pointing'])}, heatmap mass in the mask / its area "
              f"{interval(loc['summary']['mass_ratio'])} (1 = no better than an even spread)")
    check = m["input_check"]
    print(f"input check: {check['refused']} refused by the quality gate"
          + (f" ({', '.join(f'{r}: {n}' for r, n in check['refused_by_reason'].items())})" if check["refused"] else "")
          + (f"; {check['outside']} of {check['scored']} scored slices outside what the model was validated on"
             if "outside" in check else f"; {check['ood']}"))
    if m["slices_seen_in_training"]:
        print(f"WARNING: {m['slices_seen_in_training']} slices belong to the model's training or validation patients: "
              "inflated (--unseen-only leaves them out)")
    print(f"report: {folder / REPORT}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up lines and the frameworks' messages (hidden by default)")
    parser = argparse.ArgumentParser(prog="ichedge", parents=[common],
                                     description="Intracranial hemorrhage detection on head CT for edge devices")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)  # every command takes --verbose

    p = command("train", help="train and evaluate one configuration on a patient-level split")
    _config_args(p, single=True)
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="ray: the frozen backbone's features by Ray Data over --workers actors (ichedge[scale]), "
                        "cached under RUNS/.feature-cache; the head is fitted here")
    p.add_argument("--address", help="a running Ray cluster ('auto' or HOST:PORT); default: start one here")
    p.add_argument("--workers", type=int, default=2, help="Ray actors computing features")
    p.set_defaults(func=cmd_train)
    p = command("sweep", help="train a grid of (rho, alpha) configurations; paper-style table")
    _config_args(p, single=False)
    p.add_argument("--grid", help="SIZExALPHA list, e.g. 96x0.35,160x0.5 (default: the paper's five)")
    p.add_argument("--cv", type=int, nargs="?", const=5, default=1, metavar="K", dest="folds",
                   help="patient-grouped K-fold cross-validation, mean ± sd (K = 5 if not given; default: one split)")
    p.add_argument("--profile", action="store_true",
                   help="export and profile each configuration (first fold): flash, arena, latency, int8 AUC")
    p.set_defaults(func=cmd_sweep)
    p = command("tune", help="search input size, width, head, trimming, channels and recipe for the best int8 AUC "
                             "within a device's RAM and flash (Optuna TPE, patient folds, resumable)")
    p.add_argument("--ram", required=True, help="TFLM tensor arena budget, e.g. 256KiB")
    p.add_argument("--flash", required=True, help="int8 model flash budget, e.g. 512KiB or 1MiB")
    p.add_argument("--latency-ms", type=float, help="limit on the estimated MCU latency (MACs / published rate)")
    p.add_argument("--mcu", choices=list(MCUS), default="cortex-m4",
                   help="core and clock the latency estimate assumes: " + "; ".join(f"{m.name}: {m.clock_mhz:g} MHz, "
                                                                             f"e.g. {m.example}" for m in MCUS.values()))
    p.add_argument("--clock-mhz", type=float, help="the MCU's clock, if not the example board's")
    p.add_argument("--trials", type=int, default=30, help="trials that measure something new (repeats not counted)")
    p.add_argument("--data", type=Path, action="append", help="dataset(s) (default: bundled CT-ICH)")
    p.add_argument("--cv", type=int, default=5, dest="folds", metavar="K", help="patient folds per trial")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, the sampler and training")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--weights-dir", type=Path,
                   help="folder of Keras MobileNetV2 no-top ImageNet files for widths not bundled (e.g. alpha 1.0)")
    p.add_argument("--epochs", type=int, default=TrainConfig().epochs, help="epochs of the paper head and of "
                                                                              "from-scratch training")
    p.add_argument("--sizes", default="64:224:16", help="LOW:HIGH:STEP input sizes")
    p.add_argument("--alphas", default="0.05,0.1,0.35,0.5,0.75,1.0", help="widths (those without weights train "
                                                                            "from random weights)")
    p.add_argument("--heads", default="paper,multilevel")
    p.add_argument("--trim", choices=("search", "yes", "no"), default="search")
    p.add_argument("--channels", default="gray,brain-bone,2.5d", help="channel modes")
    p.add_argument("--recipes", default=",".join(PRETRAINED_RECIPES + RANDOM_RECIPES),
                   help=f"for pretrained widths {'/'.join(PRETRAINED_RECIPES)}; for random ones {'/'.join(RANDOM_RECIPES)}")
    p.add_argument("--apply", action="store_true",
                   help="train the best configuration on one patient split, export and profile it (chosen/)")
    p.add_argument("--resume", type=Path, help="an earlier search folder (or -incomplete) to continue")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="ray: --workers trials at once on Ray actors (ichedge[scale]); the pruner still judges each fold")
    p.add_argument("--address", help="a running Ray cluster ('auto' or HOST:PORT); default: start one here")
    p.add_argument("--workers", type=int, default=2, help="trials run at once on Ray")
    p.add_argument("--quiet", action="store_true")
    _grouping_args(p)
    p.set_defaults(func=cmd_tune)
    p = command("distill", help="train a tiny width from random weights with a 224x224 teacher's scores and "
                                "attention maps (knowledge distillation); writes a run folder")
    p.add_argument("--data", type=Path, action="append", help="labelled dataset (default: bundled CT-ICH)")
    p.add_argument("--alpha", type=float, default=0.1, help="the student's width multiplier")
    p.add_argument("--size", type=int, default=96, help="the student's input resolution")
    p.add_argument("--epochs", type=int, default=DistillConfig(alpha=0.1).epochs)
    p.add_argument("--unlabelled", type=Path,
                   help="extra slices seen through the teacher's scores only (their licence binds the student)")
    p.add_argument("--unlabelled-count", type=int, default=1500, help="of the unlabelled slices, at most this many "
                                                                      "(seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_distill)
    p = command("crosssite", help="train at one site and at both, test at each: AUC, sensitivity and specificity "
                                  "at the shipped threshold, threshold drift (patient folds)")
    _config_args(p, single=True)
    p.add_argument("--other", type=Path, required=True, help="the second site's data (manifest or folder)")
    p.add_argument("--cv", type=int, default=5, metavar="K", dest="folds", help="patient folds over both sites")
    p.set_defaults(func=cmd_crosssite)
    p = command("export", help="write float32 and int8 .tflite, a C array and a model card for a run")
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--calibration-images", type=int, default=200, help="training-split images for int8 calibration")
    p.add_argument("--site", help="write this site's thresholds (its newest `ichedge calibrate` profile) into the "
                                  "model card, with its bounds: ichedge then applies them to this export")
    p.set_defaults(func=cmd_export)
    p = command("profile", help="parameters, MACs, flash, TFLM arena, latency and int8-vs-float accuracy")
    p.add_argument("run", type=Path, help="run folder (exported)")
    p.add_argument("--export", type=Path, help="export folder (default: the run's latest)")
    p.add_argument("--runs-latency", type=int, default=50, help="timed inferences after warm-up (at least 50)")
    p.set_defaults(func=cmd_profile)
    p = command("predict", help="score PNG/JPEG slices and DICOM series; study worklist by urgency")
    p.add_argument("paths", nargs="+", type=Path, help="image or DICOM files, or folders (searched recursively)")
    p.add_argument("--model", type=Path, required=True, help="run folder, .keras, or exported .tflite")
    p.add_argument("--explain", action="store_true", help="Grad-CAM overlay (PNG) of each flagged slice")
    p.add_argument("--explain-all", action="store_true", help="Grad-CAM overlay of every slice")
    p.add_argument("--context", action="store_true",
                   help="re-score slices with the model's slice-context stage (see `train --context`): whole "
                        "studies only; it raised slice AUC but not study AUC on CT-ICH")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder that receives the new results folder")
    _site_arg(p)
    _db_arg(p)
    p.add_argument("--no-record", action="store_true", help="record nothing in the store")
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="ray: read, decode and score series in parallel on Ray (ichedge[scale]), resumable, with "
                        "Parquet outputs; the same worklist and scores as local")
    p.add_argument("--address", help="a running Ray cluster ('auto' or HOST:PORT); default: start one here")
    p.add_argument("--workers", type=int, default=2, help="Ray scoring actors, each loading the model once")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    p = command("calibrate", help="on-site acceptance: thresholds for a target sensitivity, with a lower confidence "
                                  "bound, from a site's own labelled patients; writes a site profile")
    p.add_argument("model", type=Path, help="run folder, or a .keras/.tflite inside one (the profile is kept there)")
    p.add_argument("data", type=Path, help="the site's labelled sample, with patient IDs (manifest or folder)")
    p.add_argument("--site", default=DEFAULT_SITE,
                   help=f"site name (letters, digits, '-', '_'; default {DEFAULT_SITE}); each run adds a profile")
    p.add_argument("--sensitivity", type=float, default=DEFAULT_SENSITIVITY, help="target sensitivity")
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="one-sided confidence of the lower bound that must reach the target")
    p.add_argument("--backend", choices=BACKENDS,
                   help="for a run folder: the runtime the site will run (default: int8 if exported, else keras)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient bootstrap (slice-level bound)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(func=cmd_calibrate)
    p = command("audit", help="exact and near-duplicate images, and near twins across a split")
    p.add_argument("data", nargs="?", type=Path, help="dataset (default: bundled CT-ICH)")
    p.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                   help="pHash Hamming distance (of 256 bits) for near duplicates")
    p.add_argument("--seed", type=int, default=0, help="seed of the split audited")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    _grouping_args(p)
    p.set_defaults(func=cmd_audit)
    p = command("evaluate", help="a trained or exported model on any dataset: metrics, 95%% CIs, report")
    p.add_argument("model", type=Path, help="run folder, .keras or .tflite")
    p.add_argument("data", nargs="*", type=Path,
                   help="dataset(s) (default: bundled CT-ICH); several are reported together and per source")
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--unseen-only", action="store_true",
                   help="leave out the slices of the model's own training and validation patients")
    p.add_argument("--no-localisation", action="store_true",
                   help="skip the Grad-CAM pointing game on slices with segmentation masks (needs the Keras model)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)
    p = command("serve", help="triage web service: JSON API and a browser page")
    p.add_argument("--model", type=Path, required=True, help="run folder (serves its latest export), .tflite or .keras")
    p.add_argument("--backend", choices=BACKENDS, default="int8", help="for a run folder")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-files", type=int, default=256, help="files per request")
    p.add_argument("--max-file-mb", type=float, default=16, help="size of one file")
    p.add_argument("--keep-uploads", type=Path,
                   help="save usable uploads here, DICOM de-identified, for `ichedge feedback export` "
                        f"(default with a record: {default_uploads()})")
    p.add_argument("--no-keep-uploads", action="store_true", help="keep no upload (feedback then exports no image)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip Grad-CAM (no Keras model needed)")
    _site_arg(p)
    p.add_argument("--tokens", type=Path, default=tokens_file(),
                   help="bearer tokens (`ichedge token create`); required as soon as it holds one, and to listen "
                        "beyond this machine (default: %(default)s)")
    p.add_argument("--certfile", help="TLS certificate (PEM): serve HTTPS; required to listen beyond this machine")
    p.add_argument("--keyfile", help="TLS private key (PEM), unless the certificate file holds it")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a host name clients use to reach the service (repeat; needed beyond loopback)")
    _db_arg(p)
    p.add_argument("--no-record", action="store_true",
                   help="keep no record: no audit of requests, no feedback, no monitoring")
    p.add_argument("--insecure-expose", action="store_true",
                   help="listen beyond this machine without TLS or tokens (uploads and results travel in clear, "
                        "anyone who reaches the port can use it)")
    p.set_defaults(func=cmd_serve)
    p = command("feedback", help="readers' feedback from the store as a dataset: `feedback export`")
    p.add_argument("action", choices=("export",))
    _db_arg(p)
    p.add_argument("--uploads", type=Path, default=default_uploads(),
                   help="where `serve` kept the de-identified uploads (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder that receives the new dataset folder")
    p.set_defaults(func=cmd_feedback)
    p = command("retrain", help="train a challenger with feedback data, compare it with the champion on the same "
                                "held-out patients and on held-out feedback, promote only if no worse")
    p.add_argument("champion", type=Path, help="the current model's run folder")
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="feedback dataset(s) (`ichedge feedback export`), added to the champion's training patients")
    p.add_argument("--holdout", type=float, default=0.5, help="share of feedback studies held out for the comparison")
    p.add_argument("--sensitivity-margin", type=float, default=Gate().sensitivity_margin,
                   help="the fall of sensitivity the paired 95%% interval may not reach")
    p.add_argument("--auc-margin", type=float, default=Gate().auc_margin, help="the AUC drop tolerated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    _db_arg(p)
    p.add_argument("--no-record", action="store_true", help="do not record the decision in the store")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_retrain)
    p = command("monitor", help="weekly volume, flag rates, score drift (PSI), OOD rate and reader agreement "
                                "from the store; exit 1 on drift")
    _db_arg(p)
    p.add_argument("--model", help="model id (default: the one recorded last)")
    p.set_defaults(func=cmd_monitor)
    p = command("token", help="bearer tokens for `ichedge serve`: create (shown once), list, revoke")
    p.add_argument("action", choices=("create", "list", "revoke"))
    p.add_argument("name", nargs="?", help="who or what uses the token (create, revoke)")
    p.add_argument("--tokens", type=Path, default=tokens_file(), help="token file (default: %(default)s)")
    p.set_defaults(func=cmd_token)
    return parser


def run(argv: list[str]) -> int:
    """Parse ``argv`` and run the command; a problem with the user's input exits 2 with one line."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, TFLMError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
