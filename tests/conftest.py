"""Suite-wide guard: tests write under their own temporary folders, never into the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRITABLE = ("data", "outputs", "models", "logs", "cache", "dist")


def _written() -> set[str]:
    """Every file below the folders a workflow writes to in the bundle root."""
    return {str(p.relative_to(ROOT)) for d in WRITABLE if (ROOT / d).is_dir() for p in (ROOT / d).rglob("*")}


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean():
    before = _written()
    yield
    new = sorted(_written() - before)
    assert not new, f"tests wrote into the checkout (use tmp_path and overrides_for): {new[:10]}"
