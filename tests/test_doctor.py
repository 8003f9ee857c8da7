"""``nexabind doctor`` proves the whole chain, or fails with what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    return subprocess.run(
        [sys.executable, "-m", "nexabind", "doctor", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_doctor_generates_with_a_tiny_model(libdir: Path) -> None:
    r = _doctor("--lib-path", str(libdir))
    assert r.returncode == 0, r.stderr
    assert "nexabind doctor: OK" in r.stderr
    assert str(libdir.resolve()) in r.stdout and "CPU variant:" in r.stdout
    assert "llama.cpp:" in r.stdout
    assert "device:" in r.stdout and "generated:" in r.stdout


def test_doctor_json(libdir: Path) -> None:
    r = _doctor("--lib-path", str(libdir), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["tokens"]) == 8 and report["tok_per_s"] > 0
    assert report["devices"] and "CPU" in report["system_info"]


def test_doctor_fails_clearly_without_a_library(tmp_path: Path) -> None:
    r = _doctor("--lib-path", str(tmp_path / "missing"))
    assert r.returncode != 0
    assert "FAILED" in r.stderr and "run `nexabind fetch`" in r.stderr
    assert str(tmp_path / "missing") in r.stderr
