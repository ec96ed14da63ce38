"""The throwaway PostgreSQL server the suite's database tests run against (tests/postgres.py)."""

from __future__ import annotations

import sqlalchemy as sa

from tests.postgres import PostgresServer


def test_a_real_postgres_database_round_trips_rows(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT version()")).scalar_one().startswith("PostgreSQL ")
            conn.execute(sa.text("CREATE TABLE scans (id serial PRIMARY KEY, label text NOT NULL)"))
            conn.execute(sa.text("INSERT INTO scans (label) VALUES ('bleed'), ('normal')"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT id, label FROM scans ORDER BY id")).all() == [
                (1, "bleed"), (2, "normal")]
    finally:
        engine.dispose()


def test_each_database_is_independent(postgres_server: PostgresServer, postgres_url: str) -> None:
    other = sa.create_engine(postgres_server.new_database("independent_of_postgres_url"))
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE scans (id int)"))
        assert sa.inspect(engine).get_table_names() == ["scans"]
        assert sa.inspect(other).get_table_names() == []
    finally:
        engine.dispose()
        other.dispose()
        postgres_server.drop_database("independent_of_postgres_url")
