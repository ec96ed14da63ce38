"""The feedback store: models, requests (the audit log), predictions, slices, feedback, retrains.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(12), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("run", sa.Text),
        sa.Column("registered", TIME, nullable=False),
        sa.Column("slice_threshold", sa.Float, nullable=False),
        sa.Column("study_threshold", sa.Float, nullable=False),
        sa.Column("reference", sa.JSON),
    )
    op.create_table(
        "requests",
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
    op.create_table(
        "predictions",
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
    op.create_table(
        "slices",
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
    op.create_table(
        "feedback",
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
    op.create_table(
        "retrains",
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


def downgrade() -> None:
    for table in ("retrains", "feedback", "slices", "predictions", "requests", "models"):
        op.drop_table(table)
