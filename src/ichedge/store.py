"""The record of what the model said and what readers answered: a SQL store through SQLAlchemy.

An embedded SQLite file by default (:func:`default_url`, under the ichedge home), PostgreSQL by
URL for a multi-user site (``postgresql+psycopg://...``, the ``ichedge[postgresql]`` extra). The
schema is migrated by Alembic (``ichedge/migrations``) whenever a store opens, so an older
store is upgraded in place and a newer one is refused.

Tables: ``models`` (each model served, with its validation scores: the monitor's baseline),
``requests`` (one row per scoring request or batch: the service's audit log), ``predictions``
(one per study per request), ``slices``, ``feedback`` (a reader's verdict on a study or a slice,
a bleed's place and subtype) and ``retrains`` (each gated retrain's decision and figures).
Studies and slices are named by content hashes only; no name, ID or pixel from a header is
ever stored. Rows are appended, never rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from ichedge.access import STUDY_HASH, default_home

log = logging.getLogger(__name__)

DB_FILE, UPLOADS = "ichedge.db", "uploads"
SUBTYPES = ("IVH", "IPH", "SAH", "EDH", "SDH")  # CT-ICH's hemorrhage types
VERDICTS = ("confirm", "reject")
SLICE_HASH = STUDY_HASH

TIME = sa.DateTime(timezone=True)
metadata = sa.MetaData()
# The schema as the migrations leave it (tests compare the two); change both together.
models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.String(12), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("run", sa.Text),
    sa.Column("registered", TIME, nullable=False),
    sa.Column("slice_threshold", sa.Float, nullable=False),
    sa.Column("study_threshold", sa.Float, nullable=False),
    sa.Column("reference", sa.JSON),
)
requests = sa.Table(
    "requests", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", TIME, nullable=False, index=True),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("reader", sa.String(64)),
    sa.Column("client", sa.String(64)),
    sa.Column("method", sa.String(8)),
    sa.Column("path", sa.String(200)),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("model", sa.String(12)),
    sa.Column("n_files", sa.Integer),
    sa.Column("latency_ms", sa.Float),
)
predictions = sa.Table(
    "predictions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Integer, sa.ForeignKey("requests.id"), nullable=False, index=True),
    sa.Column("time", TIME, nullable=False, index=True),
    sa.Column("model", sa.String(12), nullable=False),
    sa.Column("study", sa.String(64), nullable=False, index=True),
    sa.Column("slices", sa.Integer, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("slice_threshold", sa.Float, nullable=False),
    sa.Column("study_threshold", sa.Float, nullable=False),
    sa.Column("flagged", sa.Boolean, nullable=False),
    sa.Column("outside_slices", sa.Integer, nullable=False),
    sa.Column("scoring", sa.String(16), nullable=False),
    sa.Column("site", sa.String(64)),
)
slices = sa.Table(
    "slices", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("prediction_id", sa.Integer, sa.ForeignKey("predictions.id"), nullable=False, index=True),
    sa.Column("slice_hash", sa.String(64), nullable=False, index=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("flagged", sa.Boolean, nullable=False),
    sa.Column("ood_score", sa.Float),
    sa.Column("outside", sa.Boolean, nullable=False),
    sa.Column("kept", sa.String(64)),
)
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", TIME, nullable=False, index=True),
    sa.Column("reader", sa.String(64)),
    sa.Column("prediction_id", sa.Integer, sa.ForeignKey("predictions.id"), nullable=False, index=True),
    sa.Column("study", sa.String(64), nullable=False, index=True),
    sa.Column("slice_hash", sa.String(64)),
    sa.Column("verdict", sa.String(8), nullable=False),
    sa.Column("hemorrhage", sa.Boolean, nullable=False),
    sa.Column("subtype", sa.String(3)),
    sa.Column("x", sa.Float),
    sa.Column("y", sa.Float),
)
retrains = sa.Table(
    "retrains", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", TIME, nullable=False),
    sa.Column("champion", sa.String(12), nullable=False),
    sa.Column("challenger", sa.String(12), nullable=False),
    sa.Column("champion_run", sa.Text),
    sa.Column("challenger_run", sa.Text),
    sa.Column("promoted", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("figures", sa.JSON, nullable=False),
)


class FeedbackError(ValueError):
    """Feedback that cannot be recorded: an unknown prediction or slice, a contradiction."""


def default_url(home: Path | None = None) -> str:
    """SQLite in the ichedge home (:func:`ichedge.access.default_home`): ``ichedge.db``."""
    return f"sqlite:///{(home or default_home()) / DB_FILE}"


def default_uploads(home: Path | None = None) -> Path:
    """Where ``ichedge serve`` keeps de-identified uploads for feedback export, by default."""
    return (home or default_home()) / UPLOADS


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL as given (``sqlite:///...``, ``postgresql+psycopg://...``), or a file path as SQLite."""
    text = str(db)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser()}"


def model_id(path: str | Path) -> str:
    """A model's id: the first 12 hex of its file's SHA-256 (the same bytes, the same id, anywhere)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:12]


def now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(t: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class SliceRecord:
    """One scored slice as the store keeps it: its content hash, never its name."""

    slice_hash: str
    position: int
    probability: float
    flagged: bool
    ood_score: float | None
    outside: bool
    kept: str | None = None  # the de-identified copy's file name in the uploads folder


@dataclass(frozen=True)
class StudyRecord:
    """One study's decision in one request."""

    study: str  # study_hash of its slices' content hashes
    score: float
    flagged: bool
    outside_slices: int
    slices: Sequence[SliceRecord]


def _alembic(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("ichedge") / "migrations"))
    cfg.attributes["connection"] = connection
    return cfg


class Store:
    """Predictions, feedback and retrain decisions in one database; safe to share between threads."""

    def __init__(self, url: str | Path) -> None:
        self.url = database_url(url)
        if self.url.startswith("sqlite:///") and self.url != "sqlite:///:memory:":
            Path(self.url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.engine = sa.create_engine(self.url)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
            raise ValueError(f"database {self.safe_url()}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._lock = threading.Lock()  # SQLite takes one writer at a time; a lock is cheaper than its retries
        self.migrate()

    def safe_url(self) -> str:
        """The URL without its password, for messages and logs."""
        try:
            return sa.make_url(self.url).render_as_string(hide_password=True)
        except sa.exc.ArgumentError:
            return "(unparsable URL)"

    def migrate(self) -> None:
        """Bring the schema to this ichedge's revision; refuse a store made by a newer one."""
        head = ScriptDirectory.from_config(_alembic()).get_current_head()
        try:
            with self.engine.begin() as conn:
                current = MigrationContext.configure(conn).get_current_revision()
                known = {s.revision for s in ScriptDirectory.from_config(_alembic()).walk_revisions()}
                if current is not None and current not in known:
                    raise ValueError(f"database {self.safe_url()}: schema revision {current} is newer than this "
                                     f"ichedge knows ({head}): upgrade ichedge")
                if current != head:
                    command.upgrade(_alembic(conn), "head")
                    log.info("feedback store %s: schema at revision %s", self.safe_url(), head)
        except sa.exc.OperationalError as exc:
            raise ValueError(f"database {self.safe_url()}: cannot open ({exc.orig})") from None

    def close(self) -> None:
        self.engine.dispose()

    # --- writing -------------------------------------------------------------------------------

    def register_model(self, model_id: str, name: str, kind: str, run: str | None, slice_threshold: float,
                       study_threshold: float, reference: Sequence[float] | None) -> None:
        """Record a model once (by id) with its validation slice scores, the monitor's baseline."""
        with self._lock, self.engine.begin() as conn:
            if conn.execute(sa.select(models.c.id).where(models.c.id == model_id)).first() is None:
                conn.execute(models.insert().values(
                    id=model_id, name=name[:200], kind=kind, run=run, registered=now(), slice_threshold=slice_threshold,
                    study_threshold=study_threshold, reference=None if reference is None else [round(float(p), 6)
                                                                                              for p in reference]))

    def record(self, *, channel: str, status: int, model: str | None = None, reader: str | None = None,
               client: str | None = None, method: str | None = None, path: str | None = None,
               n_files: int | None = None, latency_ms: float | None = None, studies: Iterable[StudyRecord] = (),
               slice_threshold: float | None = None, study_threshold: float | None = None, scoring: str = "slice",
               site: str | None = None) -> dict[str, int]:
        """One request (the audit record) and its studies' decisions; returns prediction ids by study hash."""
        studies = list(studies)
        for st in studies:
            if not STUDY_HASH.fullmatch(st.study) or any(not SLICE_HASH.fullmatch(s.slice_hash) for s in st.slices):
                raise ValueError("studies and slices are recorded by content hash only, never by name or ID")
        t = now()
        ids = {}
        with self._lock, self.engine.begin() as conn:
            request_id = conn.execute(requests.insert().values(
                time=t, channel=channel, reader=reader, client=client, method=method, path=path, status=status,
                model=model, n_files=n_files, latency_ms=None if latency_ms is None else round(latency_ms, 2)
            )).inserted_primary_key[0]
            for st in studies:
                pid = conn.execute(predictions.insert().values(
                    request_id=request_id, time=t, model=model, study=st.study, slices=len(st.slices), score=st.score,
                    slice_threshold=slice_threshold, study_threshold=study_threshold, flagged=st.flagged,
                    outside_slices=st.outside_slices, scoring=scoring, site=site)).inserted_primary_key[0]
                if st.slices:
                    conn.execute(slices.insert(), [
                        {"prediction_id": pid, "slice_hash": s.slice_hash, "position": s.position,
                         "probability": s.probability, "flagged": s.flagged, "ood_score": s.ood_score,
                         "outside": s.outside, "kept": s.kept} for s in st.slices])
                ids[st.study] = pid
        return ids

    def add_feedback(self, prediction: int, *, verdict: str | None = None, slice_hash: str | None = None,
                     subtype: str | None = None, point: tuple[float, float] | None = None,
                     reader: str | None = None) -> dict:
        """A reader's verdict on a study decision (``slice_hash`` None) or a slice decision.

        ``verdict`` confirms or rejects the model's flag; the reader's truth (``hemorrhage``)
        follows from it. A bleed's ``point`` (fractions of width and height) or ``subtype`` says
        there is a bleed: the verdict then follows from the flag when not given, and one that
        contradicts it is refused.
        """
        if verdict is not None and verdict not in VERDICTS:
            raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}")
        if subtype is not None and subtype not in SUBTYPES:
            raise FeedbackError(f"subtype must be one of {', '.join(SUBTYPES)}")
        if point is not None:
            if slice_hash is None:
                raise FeedbackError("a bleed is marked on a slice: give the slice")
            if not all(0.0 <= v <= 1.0 for v in point):
                raise FeedbackError("a point is two fractions of the image's width and height, each in [0, 1]")
        with self._lock, self.engine.begin() as conn:
            pred = conn.execute(sa.select(predictions.c.study, predictions.c.flagged)
                                .where(predictions.c.id == prediction)).first()
            if pred is None:
                raise FeedbackError(f"no prediction {prediction} in this store")
            flagged = pred.flagged
            if slice_hash is not None:
                row = conn.execute(sa.select(slices.c.flagged).where(slices.c.prediction_id == prediction,
                                                                      slices.c.slice_hash == slice_hash)).first()
                if row is None:
                    raise FeedbackError(f"prediction {prediction} has no slice {slice_hash[:16]}")
                flagged = row.flagged
            bleed = point is not None or subtype is not None
            if verdict is None:
                if not bleed:
                    raise FeedbackError("give a verdict (confirm or reject), or mark a bleed")
                verdict = "confirm" if flagged else "reject"
            hemorrhage = flagged == (verdict == "confirm")
            if bleed and not hemorrhage:
                raise FeedbackError(f"a marked bleed contradicts '{verdict}' of a decision that "
                                    f"{'flagged' if flagged else 'did not flag'} it")
            values = dict(time=now(), reader=reader, prediction_id=prediction, study=pred.study, slice_hash=slice_hash,
                          verdict=verdict, hemorrhage=hemorrhage, subtype=subtype,
                          x=None if point is None else float(point[0]), y=None if point is None else float(point[1]))
            fid = conn.execute(feedback.insert().values(**values)).inserted_primary_key[0]
        return _feedback_json({"id": fid, **values})

    def record_retrain(self, *, champion: str, challenger: str, champion_run: str, challenger_run: str,
                       promoted: bool, reason: str, figures: dict) -> int:
        with self._lock, self.engine.begin() as conn:
            return conn.execute(retrains.insert().values(
                time=now(), champion=champion, challenger=challenger, champion_run=champion_run,
                challenger_run=challenger_run, promoted=promoted, reason=reason, figures=figures)).inserted_primary_key[0]

    # --- reading -------------------------------------------------------------------------------

    def history(self, study: str, limit: int = 50) -> dict:
        """Earlier decisions on a study and readers' feedback on it, newest first."""
        with self.engine.connect() as conn:
            preds = conn.execute(sa.select(predictions).where(predictions.c.study == study)
                                 .order_by(predictions.c.id.desc()).limit(limit)).mappings().all()
            notes = conn.execute(sa.select(feedback).where(feedback.c.study == study)
                                 .order_by(feedback.c.id.desc()).limit(limit)).mappings().all()
        return {"study": study,
                "predictions": [{"id": p["id"], "time": as_utc(p["time"]).isoformat(timespec="seconds"),
                                 "model": p["model"], "score": p["score"], "flagged": p["flagged"],
                                 "study_threshold": p["study_threshold"]} for p in preds],
                "feedback": [_feedback_json(dict(f)) for f in notes]}

    def table(self, name: str) -> list[dict]:
        """Every row of one table, oldest first (reports and tests)."""
        t = metadata.tables[name]
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns)).mappings()]

    def models(self) -> list[dict]:
        """Id, name and kind of each model recorded, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(models.c.id, models.c.name, models.c.kind)
                                .order_by(models.c.registered.desc())).mappings().all()
        return [dict(r) for r in rows]

    def model(self, model_id: str | None = None) -> dict | None:
        """A registered model, or the one registered last."""
        q = sa.select(models)
        q = q.where(models.c.id == model_id) if model_id else q.order_by(models.c.registered.desc())
        with self.engine.connect() as conn:
            row = conn.execute(q.limit(1)).mappings().first()
        return dict(row) if row else None


def _feedback_json(row: dict) -> dict:
    point = None if row.get("x") is None else {"x": row["x"], "y": row["y"]}
    return {"id": row["id"], "time": as_utc(row["time"]).isoformat(timespec="seconds"), "reader": row["reader"],
            "prediction": row["prediction_id"], "study": row["study"], "slice": row["slice_hash"],
            "verdict": row["verdict"], "hemorrhage": row["hemorrhage"], "subtype": row["subtype"], "point": point}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    """WAL lets the monitor read while the service writes; with NORMAL sync a power cut may lose the last
    commits but never corrupts the file, and a commit costs no fsync (the recording budget is 5 ms)."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
