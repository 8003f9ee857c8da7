"""The model commands (pull, models, rm, run) and the command names, against the loopback hub."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

from _hub import Hub
from click.testing import CliRunner

from nexabind import hub
from nexabind.cli import cli

TINY = "acme/tiny-GGUF"


def test_help_names_the_commands_and_the_aliases(runner: CliRunner) -> None:
    out = runner.invoke(cli, ["--help"]).stdout
    commands, aliases = out.split("Aliases")
    for name in ("pull", "models", "rm", "run", "lib", "info", "doctor"):
        assert f"\n  {name} " in commands
    for name, target in [("list", "lib list"), ("fetch", "lib fetch"), ("infer", "run")]:
        assert f"\n  {name} " not in commands
        assert f"  {name}" in aliases and f"= nexabind {target}" in aliases
    lib = runner.invoke(cli, ["lib", "--help"]).stdout
    assert all(f"\n  {n} " in lib for n in ("fetch", "build", "list", "verify", "which", "clean"))
    # An alias runs its command.
    assert runner.invoke(cli, ["list", "--json"]).stdout == (
        runner.invoke(cli, ["lib", "list", "--json"]).stdout
    )
    assert "Chat with MODEL" in runner.invoke(cli, ["infer", "--help"]).stdout


def test_pull_models_rm(runner: CliRunner, hf_hub: Hub) -> None:
    r = runner.invoke(cli, ["pull", TINY])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip())
    assert path.name == "tiny-Q4_K_M.gguf" and path.is_file()
    assert f"{TINY}:Q4_K_M: 442.6 kB in " in r.stderr
    r = runner.invoke(cli, ["pull", f"{TINY}:Q8_0", "--json"])
    assert json.loads(r.stdout)["quant"] == "Q8_0"

    table = runner.invoke(cli, ["models"]).stdout.splitlines()
    assert table[0].split() == ["MODEL", "SIZE", "ARCH", "PARAMS", "CONTEXT", "LAST", "USED"]
    assert table[1].split() == [f"{TINY}:Q4_K_M", "442.6", "kB", "llama", "108.6K", "2048", "never"]
    listed = json.loads(runner.invoke(cli, ["models", "--json"]).stdout)
    assert [m["name"] for m in listed] == [f"{TINY}:Q4_K_M", f"{TINY}:Q8_0"]
    assert {k for k in listed[0]} >= {"repo", "file", "quant", "size", "architecture"}
    assert (listed[0]["parameters"], listed[0]["context_length"]) == (108608, 2048)

    r = runner.invoke(cli, ["rm", f"{TINY}:Q4_K_M"])
    assert r.exit_code == 0 and r.stdout.startswith("removed ") and "tiny-Q4_K_M" in r.stdout
    r = runner.invoke(cli, ["rm", f"{TINY}:Q4_K_M"])
    assert r.exit_code == 1 and f"it holds: {TINY}:Q8_0" in r.stderr
    runner.invoke(cli, ["rm", TINY])
    r = runner.invoke(cli, ["models"])
    assert r.stdout == "" and "no models in " in r.stderr


def test_bad_input_is_a_clear_error(runner: CliRunner, hf_hub: Hub) -> None:
    for args, says in [
        (["pull", "acme/nothing"], "no repository acme/nothing"),
        (["pull", "acme/plain"], "holds no GGUF model"),
        (["pull", f"{TINY}:Q3_K_S"], "no Q3_K_S model; it has: Q4_K_M"),
        (["pull", "not a name"], "is not a model name"),
        (["run", "tiny-GGUF", "-p", "hi"], "no file tiny-GGUF and no cached model"),
        (["run", TINY, "-p", "hi"], "pass --yes to pull it here"),
    ]:
        r = runner.invoke(cli, args)
        assert r.exit_code == 1 and says in r.stderr, (args, r.output)
    assert not hf_hub.downloads()


def test_run_a_prompt(runner: CliRunner, hf_hub: Hub, libdir: Path) -> None:
    os.environ["NEXABIND_LIB_PATH"] = str(libdir)
    # Not cached: --yes pulls it first; the model has no template, so chatml is used.
    args = ["run", TINY, "-p", "Hello", "-n", "8", "--temp", "0", "--yes", "--stats"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "has no chat template; using chatml" in r.stderr
    assert "reply 8 tokens" in r.stderr and "; length]" in r.stderr
    reply = r.stdout
    # Cached now: the same reply, nothing asked of the hub, and it counts as used.
    seen = len(hf_hub.log)
    assert runner.invoke(cli, ["infer", TINY, "-p", "Hello", "-n", "8", "--temp", "0"]).stdout == (
        reply
    )
    assert len(hf_hub.log) == seen
    (m,) = hub.models()
    assert m.last_used is not None
    # --raw completes the text; a file path works as the model.
    r = runner.invoke(cli, ["run", str(m.path), "-p", "Hello", "--raw", "-n", "5", "--temp", "0"])
    assert r.exit_code == 0 and r.stdout.endswith("\n") and "chat template" not in r.stderr


def _nexabind(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nexabind", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]


def test_cached_model_runs_offline_as_a_real_process(hf_hub: Hub, libdir: Path) -> None:
    r = _nexabind("pull", "-q", TINY)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet, and no terminal: no progress bar
    hf_hub.log.clear()
    args = ("run", TINY, "-p", "Hello", "-n", "4", "--temp", "0", "-q")
    r = _nexabind(*args)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) > 1 and hf_hub.log == []  # a reply, from the cache alone
    hf_hub.stop()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    assert _nexabind(*args, env=env).stdout == r.stdout
    r = _nexabind("pull", f"{TINY}:Q8_0", env=env)
    assert r.returncode == 1 and "HF_HUB_OFFLINE is set" in r.stderr


def test_a_full_disk_is_a_clear_error(hf_hub: Hub) -> None:
    def small_files() -> None:
        # Writes past 100 kB fail with EFBIG, as a full disk fails them with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = _nexabind("pull", TINY, preexec_fn=small_files)
    assert r.returncode == 1
    assert "no room left to download acme/tiny-GGUF/tiny-Q4_K_M.gguf" in r.stderr
    assert "set HF_HUB_CACHE to a folder on a larger disk" in r.stderr
    assert "Traceback" not in r.stderr
    assert hub.models() == []


def test_run_offers_to_pull_an_unknown_model(hf_hub: Hub, libdir: Path) -> None:
    import pexpect

    args = ["-m", "nexabind", "run", TINY, "-n", "4"]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120)
    try:
        child.expect_exact(f"{TINY} is not pulled; pull it from {hf_hub.url} now? [y/N]: ")
        child.send("y\r")
        child.expect_exact(">>> ")
        child.send("/exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    (m,) = hub.models()
    assert m.name == f"{TINY}:Q4_K_M" and m.last_used is not None
