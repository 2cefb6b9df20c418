"""What a fresh machine needs: the requirements cover every import and the documented commands, CI lints with ruff
and finds the offline metadata schema."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, metadata_schema

#: distributions the documented commands load at run time without this code importing them, with the command
DOCUMENTED_COMMANDS_NEED = {
    "jsonschema": "python -m monai.bundle verify_metadata (MONAI imports it optionally)",
    "fire": "python -m monai.bundle run (MONAI's command line)",
    "pytest-xdist": "python -m pytest -n 2 --dist loadfile tests (the README's test command)",
    "ruff": "ruff check . (.ci/run)",
}
LOCAL = {"scripts", "tests", "bench", "main"}
#: the MONAI Label app runs in its own environment (apps/monailabel/install.sh): the bundle's runtime, the app's
#: requirements and monailabel itself (installed with --no-deps); bundle_tasks is the module beside its main.py
APP = "apps/monailabel"
APP_REQUIREMENTS = ("requirements.txt", f"{APP}/requirements.txt")
APP_NO_DEPS = {"monailabel", "pydicom-seg"}
APP_LOCAL = {"bundle_tasks"}


def _requirements(files=("requirements.txt", "requirements-dev.txt")) -> set[str]:
    names = set()
    for name in files:
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):
                names.add(_normal(re.split(r"[<>=!~\[; ]", line)[0]))
    return names


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_distributions(app: bool = False) -> dict[str, str]:
    """Third-party distribution -> a file importing it, over every Python file of the repository (``app``: of the
    MONAI Label app only; else every other)."""
    owners = importlib.metadata.packages_distributions()
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(part.startswith(".") for part in parts) or ("/".join(parts).startswith(f"{APP}/") != app):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in LOCAL or top == "__future__" or (app and top in APP_LOCAL):
                    continue
                for dist in owners.get(top, [top]):
                    found.setdefault(_normal(dist), str(path.relative_to(ROOT)))
    return found


def test_requirements_cover_every_import():
    missing = {d: f for d, f in _imported_distributions().items() if d not in _requirements()}
    assert not missing, f"imported but in no requirements file: {missing}"


def test_the_monailabel_recipe_covers_every_import_of_the_app():
    """The app's imports are in its environment: the bundle's runtime, its requirements, or installed --no-deps by
    apps/monailabel/install.sh."""
    recipe = (ROOT / APP / "install.sh").read_text()
    assert all(name in recipe for name in APP_NO_DEPS) and all(f in recipe.replace("$BUNDLE/", "")
                                                               for f in APP_REQUIREMENTS)
    known = _requirements(APP_REQUIREMENTS) | APP_NO_DEPS
    missing = {d: f for d, f in _imported_distributions(app=True).items() if d not in known}
    assert not missing, f"imported by the MONAI Label app but not installed by its recipe: {missing}"


@pytest.mark.parametrize("dist", list(DOCUMENTED_COMMANDS_NEED))
def test_requirements_cover_the_documented_commands(dist):
    assert _normal(dist) in _requirements(), f"{dist} is needed by {DOCUMENTED_COMMANDS_NEED[dist]}"


def test_verify_metadata_is_installed_by_the_runtime_requirements():
    """verify_metadata is a documented user command: its jsonschema comes with requirements.txt, not only -dev."""
    runtime = {_normal(re.split(r"[<>=!~\[; ]", line.split("#")[0].strip())[0])
               for line in (ROOT / "requirements.txt").read_text().splitlines() if line.split("#")[0].strip()}
    assert "jsonschema" in runtime


def test_ci_lints_before_it_tests():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert "ruff check ." in steps
    assert steps.index("ruff check .") < next(i for i, s in enumerate(steps) if "pytest" in s)


def test_ruff_passes():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if "No module named ruff" in proc.stderr:
        pytest.fail("ruff is not installed: pip install -r requirements-dev.txt")
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_schema_missing_skips_locally_and_fails_under_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        metadata_schema([tmp_path])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must clone the repository with shared/ beside it"):
        metadata_schema([tmp_path])
    (tmp_path / "shared" / "schema").mkdir(parents=True)
    (tmp_path / "shared" / "schema" / "meta_schema_20240725.json").write_text("{}")
    assert metadata_schema([tmp_path]) == tmp_path / "shared" / "schema" / "meta_schema_20240725.json"


def test_schema_is_found_beside_this_checkout():
    """From any checkout (or worktree) that sits beside shared/, as the CI clone does."""
    beside = Path(__file__).absolute().parents[2] / "shared"
    if not beside.is_dir():
        pytest.skip("no shared/ beside this checkout")
    assert metadata_schema().is_file()
