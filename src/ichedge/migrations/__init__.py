"""Alembic migrations of the feedback store (:mod:`ichedge.store`); applied when a store opens."""
