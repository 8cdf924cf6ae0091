"""``python -m bucketsync.cli``."""

from bucketsync.cli.main import entry

raise SystemExit(entry())
