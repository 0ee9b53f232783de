"""The extension surface stays documented and exercised (after datasette's habit)."""

from __future__ import annotations

import inspect
from pathlib import Path

from engine import hookspecs

ROOT = Path(__file__).parent.parent
SPECS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
         if hasattr(fn, "flywheel_spec")]


def test_there_are_hooks() -> None:
    assert {"register_processors", "register_projections"} <= set(SPECS)


def test_every_hook_has_a_docstring_saying_when_it_is_called() -> None:
    for name in SPECS:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "called" in doc.lower(), f"hook {name} does not say when it is called"


def test_every_hook_is_documented_in_the_readme_and_implemented_by_some_plugin() -> None:
    readme = (ROOT / "README.md").read_text()
    sources = "".join(p.read_text() for p in (ROOT / "plugins").glob("*.py"))
    sources += "".join(p.read_text() for p in (ROOT / "tests").glob("*.py") if p.name != "test_hookspecs.py")
    for name in SPECS:
        assert f"`{name}`" in readme, f"hook {name} is missing from the README's plugin section"
        assert f"def {name}(" in sources, f"no plugin or test implements hook {name}"
