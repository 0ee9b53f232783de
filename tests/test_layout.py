"""The layout stays honest: every package folder installs, nothing imports the old bare names,
and the import rules (pyproject's [tool.importlinter] contracts) hold."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_package_folder_is_installed_under_its_namespace_name() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = config["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *relative.parts]))
    extra, missing = sorted(listed - found), sorted(found - listed)
    assert found == listed, f"pyproject.toml lists {extra} with no folder, misses {missing}"


def test_no_code_imports_the_bare_folder_names() -> None:
    bare = re.compile(r"^\s*(from|import)\s+(engine|plugins|schemas)\b", re.M)
    offenders = []
    for folder in ("engine", "plugins", "schemas", "contrib", "tests", "ops"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and (path.suffix == ".py" or path.parent.name == "bench") and ".venv" not in path.parts:
                text = path.read_text(errors="ignore")
                if bare.search(text):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"import flywheel_loop.<name> instead of the bare folder name in {offenders}"


def test_the_import_rules_hold() -> None:
    """The engine imports no plugin; features import no other feature; the shared library no feature."""
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" in done.stdout and "0 broken" in done.stdout
