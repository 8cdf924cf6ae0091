"""``python -m bucketsync.cli``."""

from bucketsync.cli.main import main

raise SystemExit(main())
