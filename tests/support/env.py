"""What the test machine offers: the loopback host, the shared Redis, whether CI runs us."""

from __future__ import annotations

import os

HOST = "127.0.0.1"
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = "redis://127.0.0.1:6379/0"
