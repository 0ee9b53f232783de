"""The extension surface stays documented and exercised (after datasette's habit)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from flywheel_loop.engine import hookspecs

ROOT = Path(__file__).parent.parent
SPECS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "flywheel_spec")]


def test_there_are_hooks() -> None:
    assert {"register_processors", "register_projections", "register_settings", "register_commands",
            "register_services", "register_runtimes"} <= set(SPECS)


def test_every_hook_has_a_docstring_saying_when_it_is_called_and_naming_its_arguments() -> None:
    for name in SPECS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert "called" in doc.lower(), f"hook {name} does not say when it is called"
        for arg in inspect.signature(fn).parameters:
            assert f"``{arg}``" in doc or f"``{arg}(" in doc, f"hook {name}: its docstring does not describe `{arg}`"


def test_every_hook_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in SPECS:
        assert f"`{name}`" in readme, f"hook {name} is missing from the README's plugin section"


def test_every_hook_has_a_test_of_its_own() -> None:
    sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for name in SPECS:
        assert re.search(rf"def test_hook_{name}\(", sources), f"no test_hook_{name} in tests/"


def test_every_hook_is_implemented_by_a_built_in_feature_or_a_test_plugin() -> None:
    sources = "".join(p.read_text() for p in (ROOT / "plugins").rglob("*.py"))
    sources += "".join(p.read_text() for p in (ROOT / "tests").glob("*.py") if p.name != "test_hookspecs.py")
    for name in SPECS:
        assert f"def {name}(" in sources, f"no plugin or test implements hook {name}"
