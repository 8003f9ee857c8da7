"""The model commands of ``nexabind``: ``pull``, ``models``, ``rm`` and ``run`` (alias ``infer``).

Thin click commands over :mod:`nexabind.hub` and :mod:`nexabind.repl`; :data:`COMMANDS` is
what the ``nexabind`` group adds. Status goes to stderr, data to stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from nexabind import hub
from nexabind.errors import NexabindError

__all__ = ["COMMANDS", "models_cmd", "pull_cmd", "rm_cmd", "run_cmd"]

_F = TypeVar("_F", bound=Callable[..., Any])

_HUB_ENV = (
    "The hub's variables apply: HF_HUB_CACHE (else HF_HOME/hub) is the cache, HF_ENDPOINT the "
    "hub, HF_TOKEN the token for gated or private repositories; HF_HUB_OFFLINE=1 uses the "
    "cache only."
)


def _fail(e: Exception) -> click.ClickException:
    return click.ClickException(str(e))


def _status(text: str) -> None:
    click.echo(f"nexabind: {text}", err=True)


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# -- pull ------------------------------------------------------------------------------------


@click.command("pull", epilog=_HUB_ENV)
@click.argument("model")
@click.option("--revision", default="main", show_default=True, help="Branch, tag or commit.")
@click.option("-q", "--quiet", is_flag=True, help="No status lines or progress bars.")
@click.option("--json", "as_json", is_flag=True, help="Print the model as JSON.")
def pull_cmd(model: str, revision: str, quiet: bool, as_json: bool) -> None:
    """Download MODEL from the Hugging Face hub into its shared cache; print its path.

    MODEL is OWNER/REPO, OWNER/REPO:QUANT or OWNER/REPO:FILE.gguf. Without a quantization,
    Q4_K_M is chosen, else Q8_0, else the repository's first model (as llama.cpp's -hf); a
    split model comes whole. What is in the cache already is not downloaded again.
    """
    try:
        found = hub.pull(model, revision=revision, progress=_progress(quiet))
    except (NexabindError, ValueError) as e:
        raise _fail(e) from e
    if as_json:
        click.echo(json.dumps(found.to_dict(header=False), indent=1))
        return
    if not quiet:
        _status(f"{found.name}: {hub.human_size(found.size)} in {found.path.parent}")
    click.echo(str(found.path))


# -- models ----------------------------------------------------------------------------------


def _count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _when(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


@click.command("models", epilog=_HUB_ENV)
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models_cmd(as_json: bool) -> None:
    """List the GGUF models in the hub cache, with what their headers say.

    Only complete models are listed (a split model with every part); a pull that was cut
    short does not show.
    """
    found = hub.models()
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in found], indent=1))
        return
    if not found:
        _status(f"no models in {hub.hub_cache_dir()}; get one with `nexabind pull OWNER/REPO`")
        return
    rows = [("MODEL", "SIZE", "ARCH", "PARAMS", "CONTEXT", "LAST USED")]
    for m in found:
        try:
            head = m.header()
        except NexabindError as e:
            _status(f"{m.name}: {e}")
            head = {}
        rows.append(
            (
                m.name,
                hub.human_size(m.size),
                head.get("architecture") or "?",
                _count(head.get("parameters")),
                str(head.get("context_length") or "-"),
                _when(m.last_used),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# -- rm --------------------------------------------------------------------------------------


@click.command("rm", epilog=_HUB_ENV)
@click.argument("model")
def rm_cmd(model: str) -> None:
    """Delete MODEL from the hub cache: OWNER/REPO all its models, OWNER/REPO:QUANT one.

    Files other tools keep in that repository's cache (not GGUF models) stay.
    """
    try:
        removed = hub.remove(model)
    except (NexabindError, ValueError) as e:
        raise _fail(e) from e
    for p in removed:
        click.echo(f"removed {p}")


# -- run -------------------------------------------------------------------------------------


def _resolve(model: str, yes: bool, quiet: bool) -> Path:
    """A model file: ``model`` itself when it is a file, else the cached or pulled model."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    try:
        found = hub.find(model)
        if found is None:
            ref = hub.ModelRef.parse(model)
            if "/" not in ref.repo_id:
                msg = (
                    f"no file {model} and no cached model of that name; `nexabind models` "
                    "lists the cached ones, or give OWNER/REPO to pull one"
                )
                raise click.ClickException(msg)
            where = "the hub cache" if hub.offline() else hub.endpoint()
            if not yes:
                if hub.offline() or not sys.stdin.isatty():
                    msg = (
                        f"{model} is not in the hub cache; pull it with `nexabind pull "
                        f"{model}`, or pass --yes to pull it here"
                    )
                    raise click.ClickException(msg)
                click.confirm(f"{model} is not pulled; pull it from {where} now?", abort=True)
            found = hub.pull(ref, progress=_progress(quiet))
    except (NexabindError, ValueError) as e:
        raise _fail(e) from e
    hub.mark_used(found)
    return found.path


def _sampling(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


@click.command("run", epilog=_HUB_ENV + " Alias: `nexabind infer`.")
@click.argument("model")
@click.option("-p", "--prompt", help="Answer this prompt, print the reply and exit (no REPL).")
@click.option("--raw", is_flag=True, help="With -p: complete the text as is, no chat template.")
@click.option("-s", "--system", help="System prompt.")
@click.option("-n", "--max-tokens", type=int, help="Most tokens per reply [default: no limit].")
@click.option("--temp", "temperature", type=float, help="Temperature; 0 is greedy [default: 0.8].")
@click.option("--top-k", type=int, help="Top-k [default: 40].")
@click.option("--top-p", type=float, help="Top-p [default: 0.95].")
@click.option("--min-p", type=float, help="Min-p [default: 0.05].")
@click.option("--repeat-penalty", type=float, help="Repetition penalty [default: 1.0, off].")
@click.option("--seed", type=int, help="Sampling seed [default: random].")
@click.option("-c", "--ctx-size", type=int, help="Context length [default: the model's, <= 4096].")
@click.option("-t", "--threads", type=int, help="CPU threads [default: llama.cpp's choice].")
@click.option("-ngl", "--gpu-layers", type=int, help="Layers on the GPU [default: all].")
@click.option("--chat-template", help="A jinja template file, or a llama.cpp template name.")
@click.option("--stats", is_flag=True, help="After each reply, show tokens decoded and speed.")
@click.option("-y", "--yes", is_flag=True, help="Pull MODEL without asking when it is not cached.")
@click.option("-q", "--quiet", is_flag=True, help="No status lines or progress bars.")
def run_cmd(
    model: str,
    prompt: str | None,
    raw: bool,
    system: str | None,
    max_tokens: int | None,
    chat_template: str | None,
    ctx_size: int | None,
    threads: int | None,
    gpu_layers: int | None,
    stats: bool,
    yes: bool,
    quiet: bool,
    **sampling: Any,
) -> None:
    """Chat with MODEL in the terminal, or answer one prompt with -p.

    MODEL is a .gguf file or a model name as `nexabind pull` takes; a name not in the cache is
    pulled first (after asking, or at once with --yes). The chat renders the conversation with
    the model's template (chatml when it has none) and decodes only each turn's new tokens.
    """
    # In the command: they load the binding, which `nexabind --help` and the rest need not.
    from nexabind import repl
    from nexabind.llama import Llama

    path = _resolve(model, yes, quiet)
    options = _sampling(**sampling)
    template = chat_template
    if template is not None and Path(template).is_file():
        template = Path(template).read_text()
    try:
        llama = Llama(
            path, n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers, chat_template=template
        )
    except (NexabindError, ValueError) as e:
        raise _fail(e) from e
    with llama:
        stop: tuple[str, ...] = ()
        if template is None and not raw and "tokenizer.chat_template" not in llama.metadata:
            llama.chat_template = repl.FALLBACK_TEMPLATE
            stop = repl.FALLBACK_STOPS
            if not quiet:
                _status(f"{path.name} has no chat template; using chatml (see --chat-template)")
        conv = repl.Conversation(llama, system=system, max_tokens=max_tokens, stop=stop, **options)
        if prompt is None:
            from platformdirs import user_state_dir

            history = Path(user_state_dir("nexabind")) / "repl-history"
            repl.repl(conv, history=history, stats=stats)
            return
        with repl.interruptible(llama):
            pieces: Iterator[str]
            try:
                if raw:
                    text = (system or "") + prompt
                    tokens = llama.generate(text, max_tokens=max_tokens, **options)
                    pieces = (t.text for t in tokens)
                else:
                    pieces = conv.reply(prompt)
                for piece in pieces:
                    click.echo(piece, nl=False)
            except (NexabindError, ValueError) as e:
                raise _fail(e) from e
        click.echo()
        if stats and conv.last is not None:
            click.echo(str(conv.last), err=True)


#: The commands, with the names they go by.
COMMANDS: dict[str, click.Command] = {
    "pull": pull_cmd,
    "models": models_cmd,
    "rm": rm_cmd,
    "run": run_cmd,
}

#: Other names of the commands (``nexa infer`` is ``nexabind run``).
ALIASES: dict[str, str] = {"infer": "run"}
