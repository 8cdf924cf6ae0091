"""``bucketsync init``: a commented starter config, never written over an existing file."""

from __future__ import annotations

import os
from pathlib import Path

from bucketsync.core.errors import ConfigError

STARTER = """\
# bucketsync configuration (written by `bucketsync init`; see README.md and docs/drivers/).
# Every value can be overridden by an environment variable: BUCKETSYNC_ prefix, `__` for nesting,
# e.g. BUCKETSYNC_DATASETS__PHOTOS__INTERVAL=30s.

[agent]
ledger = "var/bucketsync.db"        # the SQLite ledger; a relative path is relative to the working directory
listen = "127.0.0.1:9810"           # HTTP: /metrics, /healthz, /readyz and /api/v1
# api_token_file = "/run/secrets/bucketsync_token"   # required when listen is not a loopback address
# log_level = "info"                # debug | info | warning | error
# log_format = "auto"               # auto (console on a TTY, JSON otherwise) | json | console
# grace = "10s"                     # how long SIGTERM waits for running batches to commit

# Credentials for one cloud account (kind: aws | gcp | azure). Without an integration, each
# cloud's default credential chain is used. Secrets may be given as *_file paths.
# [integrations.aws_prod]
# kind = "aws"
# access_key_id = "AKIA..."
# secret_access_key_file = "/run/secrets/aws_secret"

# A driver is one location in storage:
#   s3://bucket/prefix, gs://bucket/prefix, az://account/container/prefix, file:///abs/path
# [drivers.photos]
# url = "s3://my-bucket/photos/"
# integration = "aws_prod"
# region = "eu-west-1"
# allow_delete = false              # false: deleting an item tombstones it, the object stays

# A dataset is a catalog kept in sync with one driver.
# [datasets.photos]
# driver = "photos"
# sync = "poll"                     # poll | manual
# interval = "60s"
# include = ["**/*.jpg"]            # optional globs
# exclude = []
# read_only = false                 # refuse writes to storage through bucketsync
# max_delete_ratio = 0.5            # a run that would remove more than this share of the items aborts
# max_delete_count = 0              # ... or more than this many (0 = no cap)
"""


def write_starter(path: Path) -> Path:
    """Write the starter config to ``path`` (a folder gets ``bucketsync.toml`` inside)."""
    path = path.absolute()
    if path.is_dir():
        path = path / "bucketsync.toml"
    try:
        # O_EXCL: refusing to overwrite holds even against a file created meanwhile.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; not overwriting it (move it aside or name another path)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(STARTER)
    return path
