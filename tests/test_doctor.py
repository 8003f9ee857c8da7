"""``nexabind doctor`` proves the whole chain, or fails with what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nexabind.targets import cpu_variant_of as _variant_of


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


def test_doctor_names_the_cpu_variant_it_loaded(libdir: Path) -> None:
    r = _doctor("--lib-path", str(libdir), "--json")
    assert r.returncode == 0, r.stderr
    modules = {_variant_of(p.name) for p in libdir.glob("libggml-cpu*")} - {None}
    if not modules:  # a build without GGML_BACKEND_DL: the CPU backend is inside libggml
        return
    assert json.loads(r.stdout)["cpu_variant"] in modules


def test_cpu_variant_from_module_names() -> None:
    # x86_64 tags are words; arm64 tags hold dots and underscores (armv8.2_1).
    assert _variant_of("libggml-cpu-haswell.so") == "haswell"
    assert _variant_of("libggml-cpu-armv8.2_1.so") == "armv8.2_1"
    assert _variant_of("libggml-cpu-armv9.2_2.so") == "armv9.2_2"
    assert _variant_of("libggml-cpu.so") == "cpu"
    assert _variant_of("libggml-cpu-apple_m1.dylib") == "apple_m1"
    assert _variant_of("libggml-base.so") is None
