"""``python -m bucketsync.upstream.workers LEVEL FORMAT NICE``: a sync worker process (child.py)."""

import sys

from bucketsync.upstream.workers.child import main

sys.exit(main(sys.argv[1:]))
