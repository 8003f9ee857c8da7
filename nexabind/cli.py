"""The ``nexabind`` command: thin click commands over the library.

Status goes to stderr, data to stdout; ``--json`` where a script would read the output. The
library reports through :mod:`logging`; the commands that fetch or build show its status lines
(the ``nexabind`` logger, INFO and up) on stderr while they run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from nexabind import cache, cli_models, cli_serve, settings
from nexabind._build import build
from nexabind._fetch import fetch
from nexabind._version import __version__
from nexabind.errors import NexabindError
from nexabind.info import gather, render

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_F = TypeVar("_F", bound=Callable[..., Any])


def _setting_option(setting: settings.Setting, **kw: Any) -> Callable[[_F], _F]:
    """The flag of a setting; its help names the variable and the default.

    The command passes None for an absent flag, so that the library reads the variable
    (:mod:`nexabind.settings`) and the two cannot disagree.
    """
    env = f"{setting.env}=1" if setting.switch else setting.env
    help = f"{setting.help} [env: {env}; default: {setting.default}]."
    return click.option(setting.flag, is_flag=setting.switch, help=help, **kw)


_folder = click.Path(file_okay=False, path_type=str)


class _StatusLines(logging.Handler):
    """Each record of the library as one ``nexabind: <message>`` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"nexabind: {record.getMessage()}", err=True)
        except Exception:  # noqa: BLE001 - logging's contract: a handler never raises
            self.handleError(record)


@contextlib.contextmanager
def _status_lines(quiet: bool = False) -> Iterator[None]:
    """Show the library's status lines on stderr while a command runs; none when ``quiet``."""
    logger = logging.getLogger("nexabind")
    # With --quiet a handler that drops everything, so that warnings do not reach logging's
    # last-resort handler either.
    handler = logging.NullHandler() if quiet else _StatusLines(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _Group(click.Group):
    """A group with aliases: other names of its commands, listed apart in ``--help``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aliases: dict[str, str] = {}  # alias -> what it stands for, e.g. "lib list"

    def alias(self, name: str, command: click.Command, target: str) -> None:
        """Let ``name`` run ``command``, shown in ``--help`` as ``name = nexabind target``."""
        self.add_command(command, name)
        self.aliases[name] = target

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in super().list_commands(ctx) if n not in self.aliases]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_commands(ctx, formatter)
        if self.aliases:
            rows = [(n, f"= nexabind {t}") for n, t in sorted(self.aliases.items())]
            with formatter.section("Aliases (older or other names, still working)"):
                formatter.write_dl(rows)


@click.group(cls=_Group, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="nexabind")
def cli() -> None:
    """Prebuilt llama.cpp for Python: fetch, build, inspect and run it.

    Models from the Hugging Face hub: pull, models, rm, run. The llama.cpp library: lib.
    """


# Commands are added below, one section per area (build, fetch and cache, binding).


# --- build ---------------------------------------------------------------------------------


@cli.command("build")
@click.option("--variant", default="cpu", show_default=True, help="cpu, cuda, vulkan or metal.")
@_setting_option(settings.LLAMA_SOURCE, type=_folder)
@click.option(
    "--out", type=_folder, help="Write the artifact archive and add it to OUT/manifest.json."
)
@click.option("--install", is_flag=True, help="Install the build into the cache, as fetch does.")
@_setting_option(settings.BUILD_CACHE, type=_folder)
@_setting_option(settings.LLAMA_SDIST, type=click.Path(dir_okay=False, path_type=str))
@click.option("-j", "--jobs", type=int, help="Parallel build jobs.")
@click.option("--cmake-arg", "cmake_args", multiple=True, help="Extra CMake argument (repeat).")
@click.option(
    "--target",
    metavar="OS-ARCH",
    help="Cross-build for linux-arm64 or windows-x86_64 (cpu, with --out) [default: this machine].",
)
@click.option(
    "--all-variants",
    is_flag=True,
    default=None,
    help="Build every CPU variant (what a published artifact needs) [default: with --out; "
    "else this CPU's best variant and the baseline x64].",
)
@click.option(
    "--with-server",
    is_flag=True,
    help="Build llama-server instead (after the library; for serve --engine llama-server) and "
    "print its folder.",
)
def build_cmd(
    variant: str,
    source: str | None,
    out: str | None,
    install: bool,
    build_cache: str | None,
    sdist: str | None,
    jobs: int | None,
    cmake_args: tuple[str, ...],
    target: str | None,
    all_variants: bool | None,
    with_server: bool,
) -> None:
    """Build llama.cpp from source for this machine (cached), like the release CI does.

    With neither --out nor --install, prints the folder holding the built artifact.
    --target cross-builds on Linux x86_64 with a cross toolchain and runs the ABI probe
    under qemu-user (linux-arm64) or wine (windows-x86_64); README "Targets" lists the packages.
    """
    try:
        with _status_lines():
            path = build(
                variant,
                source=source,
                out=out,
                install=install,
                build_cache=build_cache,
                sdist=sdist,
                cmake_args=cmake_args,
                jobs=jobs,
                target=target,
                with_server=with_server,
                all_variants=all_variants,
            )
    except NexabindError as e:
        raise click.ClickException(str(e)) from e
    click.echo(str(path))


# --- fetch and cache -----------------------------------------------------------------------

_cache_dir_option = _setting_option(settings.CACHE_DIR, type=_folder)
_variant_option = _setting_option(settings.VARIANT)
_release_option = click.option(
    "--release", help="Release tag [default: the one this nexabind is built for]."
)


@cli.command("fetch")
@_variant_option
@_release_option
@_setting_option(settings.BASE_URL)
@_cache_dir_option
@_setting_option(settings.OFFLINE)
@click.option("--force", is_flag=True, help="Download and reinstall even when installed.")
@click.option("--no-build", is_flag=True, help="Do not build from source when nothing fits.")
@_setting_option(settings.ALLOW_HTTP)
@_setting_option(settings.DOWNLOAD_TIMEOUT, type=float, metavar="SECONDS")
@click.option("-q", "--quiet", is_flag=True, help="No status lines or progress bar.")
@click.option("--json", "as_json", is_flag=True, help='Print {"lib": FOLDER} as JSON.')
def fetch_cmd(
    variant: str | None,
    release: str | None,
    base_url: str | None,
    cache_dir: str | None,
    offline: bool,
    force: bool,
    no_build: bool,
    allow_http: bool,
    download_timeout: float | None,
    quiet: bool,
    as_json: bool,
) -> None:
    """Install the llama.cpp library for this machine into the cache; print its lib folder.

    Installed already: returns at once, offline. Otherwise downloads, verifies and installs the
    release's artifact for this platform; when none fits or the host is unreachable, builds it
    from source for this CPU (about 3 minutes on 2 cores) unless --no-build.
    """
    try:
        with _status_lines(quiet):
            lib = fetch(
                variant,
                release=release,
                base_url=base_url,
                cache_dir=cache_dir,
                # An absent flag leaves the environment variable in charge.
                offline=offline or None,
                force=force,
                build=not no_build,
                progress=False if quiet else None,
                allow_http=allow_http or None,
                download_timeout=download_timeout,
            )
    except (NexabindError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({"lib": str(lib)}) if as_json else str(lib))


@cli.command("list")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_cmd(cache_dir: str | None, as_json: bool) -> None:
    """List the llama.cpp libraries installed in the cache."""
    entries = [i.to_dict() for i in cache.installed(cache_dir)]
    if as_json:
        click.echo(json.dumps(entries, indent=1))
        return
    if not entries:
        click.echo(f"nothing installed in {cache.cache_root(cache_dir)}", err=True)
    for e in entries:
        state = e.get("error") or f"{e['artifact']} ({e['installed']})"
        click.echo(f"{e['release']}  {e['key']}  {e['path']}  {state}")


@cli.command("verify")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def verify_cmd(cache_dir: str | None, as_json: bool) -> None:
    """Re-hash installed files against their install records; exit 1 on any change."""
    reports = cache.verify(cache_dir)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=1))
    for r in reports if not as_json else ():
        click.echo(f"{'OK     ' if r.ok else 'CHANGED'}  {r.install.release}  {r.install.key}")
        for what in ("changed", "missing", "added"):
            for rel in getattr(r, what):
                click.echo(f"  {what}: {rel}")
        if r.error:
            click.echo(f"  {r.error}")
    if not reports:
        click.echo(f"nothing installed in {cache.cache_root(cache_dir)}", err=True)
    bad = [r for r in reports if not r.ok]
    if bad:
        raise click.ClickException(
            f"{len(bad)} installed entr{'y' if len(bad) == 1 else 'ies'} changed since install; "
            "reinstall with `nexabind fetch --force`"
        )


@cli.command("which")
def which_cmd() -> None:
    """Print the library folder nexabind would load (NEXABIND_LIB_PATH, else the cache)."""
    try:
        click.echo(str(cache.library_dir()))
    except NexabindError as e:
        raise click.ClickException(str(e)) from e


@cli.command("clean")
@_cache_dir_option
@click.option("--all", "all_", is_flag=True, help="Also remove every installed library.")
@click.option("--release", help="Also remove the installs of this release (not the one in use).")
def clean_cmd(cache_dir: str | None, all_: bool, release: str | None) -> None:
    """Remove leftovers of interrupted fetches (never the build cache); see --all, --release."""
    try:
        keep = cache.library_dir().parent
    except NexabindError:
        keep = None  # nothing in use
    try:
        removed = cache.clean(cache_dir, all=all_, release=release, keep=keep)
    except NexabindError as e:
        raise click.ClickException(str(e)) from e
    for p in removed:
        click.echo(f"removed {p}")
    click.echo(f"nexabind clean: removed {len(removed)} item(s)", err=True)


# --- info ----------------------------------------------------------------------------------


@cli.command("info")
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Inspect this manifest.json instead of the packaged one (shown as unpinned).",
)
@_variant_option
@_release_option
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info_cmd(
    manifest_path: str | None,
    variant: str | None,
    release: str | None,
    cache_dir: str | None,
    as_json: bool,
) -> None:
    """Show this platform, its GPU runtimes, the artifact chosen for it and why, the settings in
    force and the installed libraries. Downloads and loads nothing."""
    click.echo("nexabind: probing this platform (GPU runtimes in a child process)...", err=True)
    try:
        report = gather(
            manifest_path=manifest_path, variant=variant, release=release, cache_dir=cache_dir
        )
    except (NexabindError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(report, indent=1) if as_json else render(report))


# --- binding -------------------------------------------------------------------------------


@cli.command("doctor")
@_setting_option(settings.LIB_PATH, type=_folder)
@_setting_option(settings.CPU_VARIANT)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--all-variants",
    is_flag=True,
    help="Decode every weight type with every CPU variant this CPU can run (a child each) and "
    "compare each with the baseline variant x64; exit 1 if one crashes or diverges.",
)
def doctor_cmd(
    lib_path: str | None, cpu_variant: str | None, as_json: bool, all_variants: bool
) -> None:
    """Load llama.cpp, show what it found, and decode random models of real weight types.

    The quantized decodes (q4_0, q8_0) run in a child first: if ggml's pick of CPU variant
    crashes there, the best variant that works is recorded and used from then on.
    """
    # Imported here, not at the top: it loads the binding, which no other command needs.
    from nexabind.doctor import check_all_variants, diagnose

    if cpu_variant:  # read where the library loads, here and in the check children
        os.environ[settings.CPU_VARIANT.env] = cpu_variant
    if all_variants:
        try:
            rows = check_all_variants(lib_path)
        except NexabindError as e:
            raise click.ClickException(str(e)) from e
        if as_json:
            table = [{"variant": r.variant, "score": r.score, "ok": r.ok, "error": r.error,
                      "verdicts": r.verdicts} for r in rows]  # fmt: skip
            click.echo(json.dumps(table, indent=1))
        else:
            for r in rows:
                verdict = r.error or ", ".join(f"{d}: {v}" for d, v in r.verdicts.items())
                click.echo(f"{r.variant:<15} {'ok    ' if r.ok else 'FAILED'} {verdict}")
        if not all(r.ok for r in rows):
            raise click.ClickException("a CPU variant crashed or diverged from x64 (above)")
        click.echo(f"nexabind doctor: OK, {len(rows)} CPU variants agree", err=True)
        return
    try:
        report = diagnose(lib_path)
    except NexabindError as e:
        click.echo("nexabind doctor: FAILED", err=True)
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(f"library:     {report['libdir']}")
        click.echo(f"llama.cpp:   {report['llama_version']}")
        click.echo(f"ABI checked: {'yes' if report['abi_checked'] else 'no (no abi.json)'}")
        click.echo(f"system:      {report['system_info']}")
        click.echo(f"CPU variant: {report['cpu_variant']}")
        for variant, why in report["cpu_variants_skipped"].items():
            click.echo(f"skipped:     CPU variant {variant}: {why}")
        for dev in report["devices"]:
            click.echo(f"device:      {dev['name']} ({dev['description']})")
        for dtype, tokens in report["decoded"].items():
            click.echo(f"decoded:     {dtype:<6} {tokens} (in a child process)")
        click.echo(f"generated:   {report['tokens']} ({report['tok_per_s']} tok/s)")
    click.echo("nexabind doctor: OK", err=True)


@cli.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("-p", "--port", type=click.IntRange(1, 65535), default=50052, show_default=True)
@click.option(
    "-d", "--device", "devices", multiple=True,
    help="Device to serve (repeat; names as `nexabind doctor` lists them) [default: the first "
    "GPU, else the CPU].",
)  # fmt: skip
@click.option("-t", "--threads", type=click.IntRange(1), help="CPU threads [default: the cores].")
@click.option(
    "-c", "--cache", is_flag=True,
    help="Keep the tensors clients send in the user cache's rpc folder, so a reconnecting "
    "client sends only their hashes.",
)  # fmt: skip
@click.option(
    "--i-know-this-is-unauthenticated", "exposed", is_flag=True,
    help="Listen on an address other than loopback: anyone who reaches the port can run "
    "computations and read what is sent.",
)  # fmt: skip
@_setting_option(settings.LIB_PATH, type=_folder)
def rpc_server_cmd(
    host: str,
    port: int,
    devices: tuple[str, ...],
    threads: int | None,
    cache: bool,
    exposed: bool,
    lib_path: str | None,
) -> None:
    """Serve this machine's devices to llama.cpp RPC clients (Llama/Engine rpc_servers=,
    `nexabind serve --rpc`), with llama.cpp's own RPC server from the installed library.

    The protocol has no authentication and no encryption: llama.cpp says never to expose it on
    an open network. Anything but loopback needs --i-know-this-is-unauthenticated.
    """
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not exposed:
        msg = (
            f"--host {host} is not loopback, and the RPC protocol has no authentication: anyone "
            "who reaches the port can use it. Add --i-know-this-is-unauthenticated on a trusted "
            "network only, or keep --host 127.0.0.1"
        )
        raise click.UsageError(msg)
    from nexabind import lowlevel  # the binding: loaded only by the commands that need it

    cache_dir = None
    if cache:
        import platformdirs

        cache_dir = os.path.join(platformdirs.user_cache_dir("nexabind"), "rpc")
        os.makedirs(cache_dir, exist_ok=True)
    endpoint = f"{host}:{port}"
    try:
        with _status_lines():
            lowlevel.lib(lib_path)
            click.echo(
                f"nexabind rpc-server: listening on {endpoint} (RPC protocol "
                f"{lowlevel.rpc.protocol()}); clients: rpc_servers=['{endpoint}']",
                err=True,
            )
            lowlevel.rpc.serve(endpoint, devices=devices, n_threads=threads, cache_dir=cache_dir)
    except (NexabindError, ValueError) as e:
        raise click.ClickException(str(e)) from e


# --- names ---------------------------------------------------------------------------------
# Models take the top-level verbs (pull, models, rm, run); the library's commands live under
# `nexabind lib`, and their first names (fetch, build, list, ...) stay as aliases.


@click.group("lib", cls=_Group, context_settings=CONTEXT_SETTINGS)
def lib_group() -> None:
    """The llama.cpp library: fetch or build it, list, verify and clean the installs."""


for _name in ("fetch", "build", "list", "verify", "which", "clean"):
    _cmd = cli.commands[_name]
    lib_group.add_command(_cmd, _name)
    cli.aliases[_name] = f"lib {_name}"
cli.add_command(lib_group)
for _name, _cmd in cli_models.COMMANDS.items():
    cli.add_command(_cmd, _name)
cli.add_command(cli_serve.serve_cmd, "serve")
for _name, _target in cli_models.ALIASES.items():
    cli.alias(_name, cli_models.COMMANDS[_target], _target)
