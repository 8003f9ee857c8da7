"""A jinja environment for templates of unknown origin: bounded in time, size and depth.

A chat template comes with the model file, so a hostile file brings a hostile template. Jinja's
immutable sandbox already keeps it away from Python's internals; on top of it, this module
bounds what a template can cost:

- a deadline: a watchdog thread raises in the rendering thread when it runs over (pure Python
  loops included), through ``PyThreadState_SetAsyncExc``;
- a size limit on everything that can grow a value out of small inputs before it is built
  (``*``, ``**``, ``+``, ``~``, ``%``, the padding and replacing string methods and filters,
  ``join``) and on the output as it is produced;
- recursion: a ``RecursionError`` (a macro calling itself) ends the render.

Each ends the render with :class:`~nexabind.errors.TemplateError`.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from nexabind.errors import TemplateError

__all__ = ["Limits", "compile_template", "render"]

_WIDTH = re.compile(r"%[-#0 +]*(\d+)|\{[^{}]*?:[^{}]*?(\d+)[^{}]*\}")


class _Overtime(BaseException):
    """Raised asynchronously in a render that ran past its deadline (never escapes)."""


class Limits(threading.local):
    """The budget of the render running in this thread."""

    size = 1 << 22
    deadline = float("inf")


_limits = Limits()


def _too_big(what: str, n: int) -> TemplateError:
    return TemplateError(
        f"the chat template would build {what} of {n:,} characters, over the "
        f"{_limits.size:,} this render allows; the template is broken or hostile"
    )


def _check(n: int, what: str = "a value") -> None:
    if n > _limits.size:
        raise _too_big(what, n)


def _sized(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else None


def _check_widths(fmt: Any) -> None:
    if isinstance(fmt, str):
        for m in _WIDTH.finditer(fmt):
            width = int(m.group(1) or m.group(2))
            _check(width, "a padded field")


def _check_str_call(name: str, s: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Bound the result of ``s.<name>(*args)`` before it is computed; return the arguments
    to call it with (an iterable given to ``join`` is read into a list first)."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _check(args[0], f"str.{name}()")
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        _check(len(s) * max(1, tab), "str.expandtabs()")
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        _check(len(s) + (len(s) + 1) * len(new) // max(1, len(old)), "str.replace()")
    elif name in ("format", "format_map"):
        _check_widths(s)
    elif name == "join" and args:
        parts = args[0] if isinstance(args[0], (str, list, tuple)) else list(args[0])
        total = sum(len(p) if isinstance(p, str) else 0 for p in parts)
        _check(total + len(s) * max(0, len(parts) - 1), "str.join()")
        return (parts, *args[1:])
    return args


def _concat(parts: Iterable[Any]) -> str:
    strs = [_to_str(p) for p in parts]
    _check(sum(map(len, strs)), "a concatenation")
    return "".join(strs)


def _to_str(x: Any) -> str:
    """``str(x)``, refused when a container would print to more than the limit."""
    if not isinstance(x, str) and isinstance(x, (list, tuple, dict, set)):
        _check(_repr_size(x, _limits.size), "a printed container")
    return str(x)


def _repr_size(x: Any, budget: int) -> int:
    """A lower bound of ``len(repr(x))`` that stops counting past ``budget``."""
    total = 0
    stack = [x]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, (list, tuple, set)):
            total += 2 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (str, bytes)):
            total += len(item) + 2
        else:
            total += 8
    return total


def _bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    passes_context = hasattr(fn, "jinja_pass_arg")  # then the value comes second

    def checked(*call_args: Any, **kwargs: Any) -> Any:
        lead = call_args[:1] if passes_context else ()
        value, *rest = call_args[len(lead) :]
        args = tuple(rest)
        if name in ("center", "indent") and args and isinstance(args[0], int):
            lines = value.count("\n") + 1 if isinstance(value, str) else 1
            _check(args[0] * (lines if name == "indent" else 1), f"the {name} filter")
        elif name == "format":
            _check_widths(value)
        elif name == "replace" and isinstance(value, str):
            args = _check_str_call("replace", value, args)
        elif name == "join" and isinstance(value, (list, tuple)):
            sep = args[0] if args and isinstance(args[0], str) else ""
            total = sum(len(v) if isinstance(v, str) else 8 for v in value)
            _check(total + len(sep) * max(0, len(value) - 1), "the join filter")
        out = fn(*lead, value, *args, **kwargs)
        if (n := _sized(out)) is not None:
            _check(n, f"the {name} filter's result")
        return out

    # jinja passes the context / environment to filters marked for it: keep the marks.
    for mark in ("jinja_pass_arg",):
        if hasattr(fn, mark):
            setattr(checked, mark, getattr(fn, mark))
    return checked


def _environment() -> Any:
    from jinja2 import compiler, nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: Hugging Face marks the assistant's
        tokens with it (for training masks); rendering a prompt, it is its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    class CodeGenerator(compiler.CodeGenerator):
        @compiler.optimizeconst
        def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:
            self.write("environment.concat_checked((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        code_generator_class = CodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if time.monotonic() > _limits.deadline:
                raise _Overtime
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (size := _sized(seq)) is not None and isinstance(n, int):
                        _check(size * n, "a repetition")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int):
                if abs(left) > 1 and right * max(1, abs(left).bit_length()) > 4 * _limits.size:
                    raise _too_big("a power", right * abs(left).bit_length() // 3)
            elif operator == "+":
                a, b = _sized(left), _sized(right)
                if a is not None and b is not None:
                    _check(a + b, "a concatenation")
            elif operator == "%":
                _check_widths(left)
            return super().call_binop(context, operator, left, right)

        def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            if time.monotonic() > _limits.deadline:
                raise _Overtime
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                args = _check_str_call(getattr(__obj, "__name__", ""), owner, args)
            out = super().call(__context, __obj, *args, **kwargs)
            if (n := _sized(out)) is not None:
                _check(n)
            return out

        def wrap_str_format(self, value: Any) -> Any:
            wrapped = super().wrap_str_format(value)
            if wrapped is not None:  # str.format / format_map, which the sandbox rewraps
                _check_widths(value.__self__)
            return wrapped

        def concat_checked(self, parts: Iterable[Any]) -> str:
            return _concat(parts)

    # As Hugging Face transformers sets it up: break/continue and the generation tag.
    env = Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_to_str,
        extensions=["jinja2.ext.loopcontrols", Generation],
    )
    for name, fn in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, fn)
    return env


_env_lock = threading.Lock()
_env: Any = None


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, **_: Any) -> str:
    # Hugging Face's tojson: no HTML escaping, keys in order (jinja's own escapes and sorts).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)


def compile_template(source: str) -> Any:
    """Compile ``source`` in the bounded sandbox (with Hugging Face's ``tojson`` filter).

    Raises:
        jinja2.TemplateError: The template does not parse.
    """
    global _env
    with _env_lock:
        if _env is None:
            _env = _environment()
            _env.filters["tojson"] = _bounded_filter("tojson", _tojson)
        return _env.from_string(source)


class _Watchdog:
    """One thread that raises :class:`_Overtime` in renders past their deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._jobs: dict[int, int] = {}  # job id -> thread id, while the render runs
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self, deadline: float) -> int:
        job = next(self._ids)
        with self._cond:
            self._jobs[job] = threading.get_ident()
            heapq.heappush(self._heap, (deadline, job))
            if self._thread is None:
                name = "nexabind-template-deadline"
                self._thread = threading.Thread(target=self._run, name=name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return job

    def finish(self, job: int) -> None:
        """End ``job``; if it fired, withdraw an exception not delivered yet."""
        with self._cond:
            if self._jobs.pop(job, None) is None:
                _set_async_exc(threading.get_ident(), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._jobs:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, job = self._heap[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
                _set_async_exc(self._jobs.pop(job), _Overtime)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


_watchdog = _Watchdog()


def render(template: Any, variables: dict[str, Any], *, size: int, timeout: float) -> str:
    """Render ``template`` within ``size`` characters (of output and of any value built)
    and ``timeout`` seconds.

    Raises:
        TemplateError: The template raised, ran over a limit, or recursed too deep.
    """
    import jinja2

    old_size, old_deadline = _limits.size, _limits.deadline
    deadline = time.monotonic() + timeout
    _limits.size, _limits.deadline = size, deadline
    out: list[str] = []
    n = 0
    try:
        job = _watchdog.start(deadline)
        try:
            for chunk in template.generate(**variables):
                n += len(chunk)
                if n > size:
                    raise _too_big("an output", n)
                out.append(chunk)
        finally:
            _watchdog.finish(job)
    except _Overtime:
        msg = f"the chat template ran over its {timeout:g} s limit; it is broken or hostile"
        raise TemplateError(msg) from None
    except RecursionError:
        msg = "the chat template recursed too deep (a macro that calls itself?)"
        raise TemplateError(msg) from None
    except MemoryError:
        msg = "the chat template ran out of memory; it is broken or hostile"
        raise TemplateError(msg) from None
    except jinja2.TemplateError as e:
        msg = f"the chat template could not be rendered: {e}"
        raise TemplateError(msg) from e
    finally:
        _limits.size, _limits.deadline = old_size, old_deadline
    return "".join(out)
