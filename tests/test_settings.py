"""nexabind.settings: given beats the environment beats the default, read at use, read only here."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import nexabind
from nexabind import settings
from nexabind.cli import cli

PACKAGE = Path(nexabind.__file__).parent


def test_given_beats_the_environment_which_is_read_at_use(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings.BASE_URL
    monkeypatch.delenv(s.env, raising=False)
    assert s.get() is None and s.get("https://given") == "https://given"
    monkeypatch.setenv(s.env, "https://from-env")
    assert s.get() == "https://from-env" and s.get("https://given") == "https://given"
    monkeypatch.setenv(s.env, "")  # empty is unset
    assert s.get() is None


@pytest.mark.parametrize(
    ("value", "on"),
    [("1", True), ("true", True), (" YES ", True), ("on", True), ("0", False), ("no", False),
     ("", False), ("off", False), ("2", False)],
)  # fmt: skip
def test_switches(value: str, on: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.OFFLINE.env, value)
    assert settings.OFFLINE.on() is on
    assert settings.OFFLINE.on(False) is False and settings.OFFLINE.on(True) is True


def test_durations(monkeypatch: pytest.MonkeyPatch, runner: CliRunner) -> None:
    s = settings.DOWNLOAD_TIMEOUT
    monkeypatch.delenv(s.env, raising=False)
    assert s.seconds() == 1800.0 == float(s.default) and s.seconds(2.5) == 2.5
    monkeypatch.setenv(s.env, " 90 ")
    assert s.seconds() == 90.0 and s.seconds(3) == 3.0
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv(s.env, bad)
        with pytest.raises(ValueError) as e:
            s.seconds()
        assert str(e.value) == (
            "--download-timeout / NEXABIND_DOWNLOAD_TIMEOUT must be a number of seconds above 0,"
            f" got {bad!r}"
        )
    r = runner.invoke(cli, ["fetch", "--download-timeout", "0", "--base-url", "https://x.invalid"])
    assert r.exit_code == 1 and "must be a number of seconds above 0, got 0.0" in r.output


def test_every_setting_is_named_once_with_a_flag_twin() -> None:
    envs = [s.env for s in settings.SETTINGS]
    assert len(set(envs)) == len(envs) and all(e.startswith("NEXABIND_") for e in envs)
    flags = [s.flag for s in settings.SETTINGS]
    assert len(set(flags)) == len(flags) and all(f.startswith("--") for f in flags)
    assert {s.env for s in settings.SETTINGS} >= {
        "NEXABIND_ALLOW_HTTP", "NEXABIND_BUILD_CACHE", "NEXABIND_LLAMA_SOURCE",
        "NEXABIND_LLAMA_SDIST", "NEXABIND_LIB_PATH", "NEXABIND_CACHE_DIR", "NEXABIND_BASE_URL",
        "NEXABIND_OFFLINE", "NEXABIND_VARIANT", "NEXABIND_DOWNLOAD_TIMEOUT",
    }  # fmt: skip


def _environment_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """``os.environ.get("NEXABIND_…")``, ``os.getenv(…)`` and ``os.environ["NEXABIND_…"]``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            name, first = ast.unparse(node.func), node.args[0]
            reads = name in ("os.environ.get", "os.getenv", "environ.get", "getenv")
        elif isinstance(node, ast.Subscript):
            name, first = ast.unparse(node.value), node.slice
            reads = name in ("os.environ", "environ")
        else:
            continue
        if reads and isinstance(first, ast.Constant) and str(first.value).startswith("NEXABIND_"):
            found.append((node.lineno, str(first.value)))
    return found


def test_only_the_settings_module_reads_nexabind_variables() -> None:
    reads = {
        path.name: found
        for path in sorted(PACKAGE.rglob("*.py"))
        if (found := _environment_reads(ast.parse(path.read_text())))
    }
    assert set(reads) == set(), reads
    # The check itself finds such reads.
    assert _environment_reads(ast.parse("import os\nos.environ.get('NEXABIND_X')")) == [
        (2, "NEXABIND_X")
    ]


def test_every_flag_twin_is_on_the_command_line() -> None:
    helps = " ".join(
        CliRunner().invoke(cli, [cmd, "--help"]).output
        for cmd in ("fetch", "build", "info", "doctor", "list")
    )
    helps = " ".join(helps.split())  # as one line, wherever click wrapped it
    for s in settings.SETTINGS:
        assert s.flag in helps and f"[env: {s.env}" in helps, s.env


def test_a_flag_beats_the_variable(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.VARIANT.env, "vulkan")

    def variants(*args: str) -> list[str]:
        r = runner.invoke(cli, ["info", "--json", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)["choice"]["variant_order"]

    assert variants("--variant", "cpu") == ["cpu"]
    assert variants() == ["vulkan"]
