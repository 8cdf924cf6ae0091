"""Upstream: storage into the catalog (sync runs, the permission probe, pacing on the loop)."""
