"""The public surface is explicit, sorted and importable."""

from __future__ import annotations

import subprocess
import sys

import nexabind


def test_all_is_sorted_and_unique() -> None:
    assert list(nexabind.__all__) == sorted(set(nexabind.__all__))


def test_every_exported_name_resolves() -> None:
    for name in nexabind.__all__:
        assert getattr(nexabind, name) is not None, name


def test_unknown_attribute_raises() -> None:
    try:
        nexabind.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_fetch_and_build_are_the_functions_whatever_was_imported_first() -> None:
    """No submodule shares a name with a public function: importing every submodule first
    leaves ``nexabind.fetch`` and ``nexabind.build`` the functions (in a fresh process)."""
    code = (
        "import importlib, pkgutil, nexabind\n"
        "for m in pkgutil.walk_packages(nexabind.__path__, 'nexabind.'):\n"
        "    importlib.import_module(m.name)\n"
        "from nexabind import build, fetch\n"
        "import nexabind as n\n"
        "print(fetch.__name__, build.__name__, n.fetch is fetch, n.build is build,"
        " callable(fetch) and callable(build), type(fetch).__name__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["fetch", "build", "True", "True", "True", "function"]
