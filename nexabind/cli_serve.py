"""``nexabind serve``: a thin click command over :mod:`nexabind.server`."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from nexabind import settings
from nexabind.cli_models import _resolve
from nexabind.errors import NexabindError

__all__ = ["serve_cmd"]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _number(flag: str, default: float, kind: type, help: str) -> Any:
    return click.option(flag, default=default, show_default=True, type=kind, help=help)


_NO_KEYS = "to serve without keys, give no key option (or --no-auth)"
_NO_KEYS_ENV = "unset it and give no key option (or --no-auth)"


def _keys(given: tuple[str, ...], key_file: Any, no_auth: bool) -> list[str]:
    """The API keys to serve with; a key option that gives none is an error, never "no keys"
    (an empty NEXABIND_API_KEY once let every client in)."""
    if settings.API_KEY.set_but_blank() and not no_auth:
        msg = f"NEXABIND_API_KEY is set but empty: it names no key; set one, or {_NO_KEYS_ENV}"
        raise click.ClickException(msg)
    if any(not k.strip() for k in given):
        raise click.ClickException(f"--api-key '' names no key; {_NO_KEYS}")
    keys = [k.strip() for k in given]
    if key_file is not None:
        lines = [line.strip() for line in key_file]
        found = [line for line in lines if line and not line.startswith("#")]
        if not found:
            name = getattr(key_file, "name", "the key file")
            msg = f"--api-key-file {name} holds no key (only blank or comment lines); {_NO_KEYS}"
            raise click.ClickException(msg)
        keys += found
    if keys and no_auth:
        msg = "--no-auth and API keys contradict each other; give one or the other"
        raise click.ClickException(msg)
    return keys


@click.command("serve", context_settings=CONTEXT_SETTINGS)
@click.argument("model", required=False)
@click.option(
    "--models-dir",
    "models_dirs",
    multiple=True,
    type=click.Path(file_okay=False, exists=True, path_type=str),
    help="Serve every .gguf in this folder (repeatable), each named by its file's stem and "
    "loaded on its first request; instead of MODEL.",
)
@_number("--models-max", 4, int, "Models loaded at once; beyond, the least recently used idle one "
         "is unloaded.")  # fmt: skip
@click.option(
    "--default-model", help="The model of a request that names none [default: the first by name]."
)
@click.option(
    "--models-memory",
    type=float,
    help="GiB the loaded models may take, each estimated from its GGUF header (weights and KV "
    "cache); least recently used idle models are unloaded to fit [default: no budget].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "-np",
    "--parallel",
    default=4,
    show_default=True,
    type=int,
    help="Requests decoded at once (slots).",
)
@click.option("-c", "--ctx-size", type=int, help="KV cells in all, shared by the slots.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar=settings.API_KEY.env,
    help="A key requests must carry (repeat for several) [env: NEXABIND_API_KEY].",
)
@click.option(
    "--api-key-file",
    type=click.File("r"),
    help="A file of keys, one per line ('#' starts a comment line).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve without keys, on purpose (the same as giving no key option).",
)
@_number("--max-queue", 128, int, "Requests that may wait for a slot; more get 429.")
@_number(
    "--queue-timeout", 60.0, float, "Seconds a request may wait for a slot before it gets 429."
)
@click.option("--alias", help="The model's name for clients [default: the file's stem].")
@click.option("--embedding", is_flag=True, help="Serve /v1/embeddings (an embedding model).")
@click.option("--rerank", is_flag=True, help="Serve /v1/rerank (a reranking model).")
@click.option(
    "--idle-unload", type=float, help="Unload the model after this many seconds without requests."
)
@click.option(
    "--engine",
    type=click.Choice(["llama.cpp", "llama-server"]),
    default="llama.cpp",
    show_default=True,
    help="In-process engine, or a supervised llama-server (nexabind build --with-server).",
)
@click.option(
    "--server-bin",
    type=click.Path(dir_okay=False, path_type=str),
    help="The llama-server executable for --engine llama-server.",
)
@click.option("-t", "--threads", type=int, help="CPU threads of the engine.")
@click.option(
    "--rpc",
    callback=lambda _ctx, _param, value: tuple(
        s.strip() for v in value for s in v.split(",") if s.strip()
    ),
    multiple=True,
    help="llama.cpp RPC servers (HOST:PORT, comma-separated or repeated; `nexabind rpc-server` "
    "there) whose devices take layers too. Trusted networks only.",
)
@_number("--max-body", 8 << 20, int, "Largest request body in bytes (larger: 413).")
@_number("--grace", 10.0, float, "Seconds in-flight requests get to finish after SIGTERM.")
@_number("--max-messages", 2048, int, "Messages one chat may hold (more: 413).")
@_number(
    "--max-prompt-chars",
    1 << 17,
    int,
    "Characters a chat's messages or a prompt may hold in all, checked before templating and "
    "tokenizing (more: 413).",
)
@_number(
    "--max-inputs", 2048, int, "Texts per embedding request, documents per rerank (more: 413)."
)
@_number(
    "--max-input-chars", 1 << 20, int, "Characters per embedding or rerank request (more: 413)."
)
@_number("--max-connections", 4096, int, "Open connections; requests beyond get 503.")
@_number(
    "--read-timeout",
    30.0,
    float,
    "Seconds a request's headers may take to arrive (else the connection is closed), then its "
    "body (else 408).",
)
@click.option(
    "-n",
    "--n-predict",
    default=-1,
    show_default=True,
    type=int,
    help="Most tokens a request may generate (-1: until the slot is full); requests may ask "
    "for fewer with max_tokens or n_predict.",
)
@click.option(
    "--chat-template",
    help="A jinja chat template or a llama.cpp built-in name [default: the model's; chatml "
    "when it has none].",
)
@click.option(
    "--lib-path",
    type=click.Path(file_okay=False, path_type=str),
    help="Library folder to use instead of NEXABIND_LIB_PATH or the cache.",
)
@click.option("-q", "--quiet", is_flag=True, help="No access log.")
@click.option("-v", "--verbose", is_flag=True, help="Also llama.cpp's own log lines.")
def serve_cmd(
    model: str | None,
    api_keys: tuple[str, ...],
    api_key_file: Any,
    no_auth: bool,
    quiet: bool,
    verbose: bool,
    **options: Any,
) -> None:
    """Serve MODEL (a .gguf file or a pulled model's name), or every model of --models-dir,
    over an OpenAI-compatible HTTP API until SIGTERM or Ctrl-C.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/rerank, /v1/models,
    /health, /slots and /metrics. Needs the server extra: pip install 'nexabind[server]'.
    """
    import gc
    import logging

    # The entry point raises the collector's threshold for short commands; a server runs for
    # days, and with that threshold the reference cycles of finished requests (asyncio tasks,
    # exceptions) pile up between collections and RSS climbs in steps. Python's default back.
    gc.set_threshold(700, 10, 10)
    try:
        from nexabind.server import ServeOptions, serve
    except ImportError as e:
        msg = f"nexabind serve needs the server extra ({e}); pip install 'nexabind[server]'"
        raise click.ClickException(msg) from e
    keys = _keys(api_keys, api_key_file, no_auth)
    if (model is None) == (not options["models_dirs"]):
        raise click.UsageError("give MODEL or --models-dir DIR (one of the two)")
    path = "" if model is None else _resolve(model, yes=False, quiet=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if quiet:
        logging.getLogger("nexabind.server.access").setLevel(logging.WARNING)
    if not verbose:
        logging.getLogger("nexabind.llama").setLevel(logging.WARNING)
    try:
        opts = ServeOptions(str(path), api_keys=tuple(keys), **options)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    try:
        code = serve(opts)
    except (NexabindError, ValueError) as e:
        click.echo(f"Error: {e}", err=True)
        code = 1
    if code:
        what = model or ", ".join(options["models_dirs"])
        click.echo(f"Error: could not serve {what}; see the log above", err=True)
    # The server has stopped. A worker thread may still be inside a long tokenization that
    # nothing can interrupt (and the interpreter would wait for it at exit): leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if code else 0)
