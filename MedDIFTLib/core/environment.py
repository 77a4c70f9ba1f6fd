"""The environment of a child Python process that must import this package (worker, eval runs)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the folder holding ``MedDIFTLib`` first
    on ``PYTHONPATH``, so a child ``python -m MedDIFTLib...`` imports this very copy."""
    environment = dict(os.environ if base is None else base)
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, environment.get("PYTHONPATH", "")) if p)
    return environment
