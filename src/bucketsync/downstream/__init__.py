"""Downstream: the catalog into storage (user operations, the outbox, own-write checks)."""
