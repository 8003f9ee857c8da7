"""The fetch and cache commands: fetch, list, verify, which, clean; CliRunner and a process."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from _server import Server
from click.testing import CliRunner

from nexabind import pin
from nexabind.cli import cli


def test_fetch_prints_the_lib_folder_then_which_agrees(
    runner: CliRunner, cli_fetched: Path, _isolated_cache: Path
) -> None:
    lib = cli_fetched
    assert lib.is_relative_to(_isolated_cache / "libs" / pin.RELEASE) and lib.name == "lib"
    r = runner.invoke(cli, ["fetch", "--offline", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"lib": str(lib)}
    r = runner.invoke(cli, ["which"])
    assert r.exit_code == 0 and r.stdout.strip() == str(lib)


def test_which_without_a_library_exits_1_saying_what_to_run(runner: CliRunner) -> None:
    r = runner.invoke(cli, ["which"])
    assert r.exit_code == 1
    assert "no llama.cpp library found" in r.stderr and "run `nexabind fetch`" in r.stderr


def test_fetch_offline_not_cached_fails_clearly(runner: CliRunner) -> None:
    r = runner.invoke(cli, ["fetch", "--offline"])
    assert r.exit_code == 1 and "offline" in r.stderr and "nexabind fetch" in r.stderr


def test_fetch_no_build_when_unreachable(runner: CliRunner) -> None:
    r = runner.invoke(
        cli, ["fetch", "--base-url", "http://127.0.0.1:9/releases", "--no-build", "--quiet"]
    )
    assert r.exit_code == 1
    assert "nothing could be downloaded" in r.stderr and "nexabind build --install" in r.stderr


def test_list_verify_clean(runner: CliRunner, mirror_server: Server) -> None:
    r = runner.invoke(cli, ["list"])
    assert r.exit_code == 0 and "nothing installed" in r.stderr
    lib = Path(runner.invoke(cli, ["fetch", "--base-url", mirror_server.url, "-q"]).stdout.strip())
    r = runner.invoke(cli, ["list", "--json"])
    (entry,) = json.loads(r.stdout)
    assert entry["lib"] == str(lib) and entry["release"] == pin.RELEASE
    r = runner.invoke(cli, ["verify"])
    assert r.exit_code == 0 and r.stdout.startswith("OK")
    (lib.parent / "abi.json").write_text("{}")
    r = runner.invoke(cli, ["verify"])
    assert r.exit_code == 1
    assert "changed: abi.json" in r.stdout and "nexabind fetch --force" in r.stderr
    r = runner.invoke(cli, ["verify", "--json"])
    assert json.loads(r.stdout)[0]["changed"] == ["abi.json"]
    r = runner.invoke(cli, ["clean", "--release", pin.RELEASE])
    assert r.exit_code == 0 and lib.is_dir()  # the one in use stays
    r = runner.invoke(cli, ["clean", "--all"])
    assert r.exit_code == 0 and f"removed {lib.parent}" in r.stdout and not lib.exists()


def test_warm_fetch_as_a_real_process(mirror_server: Server, _isolated_cache: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    cmd = [sys.executable, "-m", "nexabind", "fetch", "--base-url", mirror_server.url]
    cold = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert cold.returncode == 0, cold.stderr
    assert "nexabind: downloading" in cold.stderr and "nexabind: installed" in cold.stderr
    assert "B/s" not in cold.stderr  # no bar off a terminal
    seen = len(mirror_server.log)
    warm = subprocess.run([*cmd, "--offline"], capture_output=True, text=True, env=env)
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout == cold.stdout and "is installed in" in warm.stderr
    assert len(mirror_server.log) == seen
    # The warm path imports neither requests nor tqdm.
    code = (
        "import sys; from nexabind import fetch; fetch(offline=True, progress=False); "
        "print(sorted(m for m in ('requests', 'tqdm') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_quiet_silences_every_status_line_warnings_too(
    mirror_server: Server, release_mirror: Path, _isolated_cache: Path
) -> None:
    """A retried download logs a warning; with -q not even logging's last resort prints it."""
    (entry,) = json.loads((release_mirror / pin.RELEASE / "manifest.json").read_text())["artifacts"]
    mirror_server.plan(f"/{pin.RELEASE}/{entry['url']}", "500")
    env = {k: v for k, v in os.environ.items() if k != "NEXABIND_LIB_PATH"}
    cmd = [sys.executable, "-m", "nexabind", "fetch", "--base-url", mirror_server.url]
    r = subprocess.run([*cmd, "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [q.status for q in mirror_server.requests_for(entry["url"])] == [500, 200]
    mirror_server.plan(f"/{pin.RELEASE}/{entry['url']}", "500")
    r = subprocess.run([*cmd, "--force"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "answered 500 Internal Server Error; retrying in 0.5 s" in r.stderr


def test_the_status_handler_is_removed_after_the_command(runner: CliRunner) -> None:
    logger = logging.getLogger("nexabind")
    before = (list(logger.handlers), logger.level)
    r = runner.invoke(cli, ["fetch", "--offline"])
    assert r.exit_code == 1 and "offline" in r.stderr
    assert (list(logger.handlers), logger.level) == before
