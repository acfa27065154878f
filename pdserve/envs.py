"""Every ``PDSERVE_*`` environment variable pdserve reads, in one place.

(``PDSERVE_KERNELS`` is read by ``pdserve.kernels.dispatch`` itself, since the kernels package
imports nothing of pdserve; it is listed here for reference.)
"""

from __future__ import annotations

import os
from pathlib import Path

PDSERVE_CACHE = "PDSERVE_CACHE"  # where models are fetched/converted (default ~/.cache/pdserve)
PDSERVE_KERNELS = "PDSERVE_KERNELS"  # auto | triton | torch
PDSERVE_API_KEYS = "PDSERVE_API_KEYS"  # comma-separated API keys for the HTTP/gRPC APIs
PDSERVE_ADMIN_TOKEN = "PDSERVE_ADMIN_TOKEN"  # token for admin/console controls
PDSERVE_API_KEY = "PDSERVE_API_KEY"  # the key ``pdserve client`` / ``pdserve.client`` send
PDSERVE_LOG_LEVEL = "PDSERVE_LOG_LEVEL"  # python logging level name (default INFO)


def cache_dir() -> Path:
    return Path(os.environ.get(PDSERVE_CACHE) or Path.home() / ".cache" / "pdserve")


def log_level() -> str:
    return os.environ.get(PDSERVE_LOG_LEVEL, "INFO").upper()


def api_keys() -> list[str]:
    """The API keys in ``PDSERVE_API_KEYS`` (comma-separated; blanks dropped)."""
    return [k.strip() for k in os.environ.get(PDSERVE_API_KEYS, "").split(",") if k.strip()]


def admin_token() -> str | None:
    return os.environ.get(PDSERVE_ADMIN_TOKEN) or None


def client_api_key() -> str | None:
    return os.environ.get(PDSERVE_API_KEY) or None
