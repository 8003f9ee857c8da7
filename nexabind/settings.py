"""Every ``NEXABIND_*`` environment variable, its command-line twin, and how a value resolves.

A value given explicitly (a function argument, which the CLI fills from the flag) wins over the
environment variable, which wins over the default. Settings are read when they are used, never
at import, so a program may change its environment between calls. This module is the only one
that reads them; ``nexabind info`` lists :data:`SETTINGS` and the CLI builds its flags' help
from them.
"""

from __future__ import annotations

import os
from typing import TypeVar

from nexabind import pin

__all__ = [
    "ALLOW_HTTP",
    "BASE_URL",
    "BUILD_CACHE",
    "CACHE_DIR",
    "CPU_VARIANT",
    "DOWNLOAD_TIMEOUT",
    "LIB_PATH",
    "LLAMA_SDIST",
    "LLAMA_SOURCE",
    "OFFLINE",
    "SETTINGS",
    "VARIANT",
    "Setting",
]

_T = TypeVar("_T")

#: Values that turn a switch on (case and surrounding spaces do not matter).
_ON = ("1", "true", "yes", "on")


class Setting:
    """One environment variable and the command-line option that sets the same thing.

    (A plain class: a frozen dataclass would compile five methods on every start-up.)

    Attributes:
        env: The variable, e.g. ``NEXABIND_CACHE_DIR``.
        flag: Its twin on the command line, e.g. ``--cache-dir``.
        help: What it sets, in one line.
        default: What applies when it is unset, in words.
        switch: A yes/no setting: ``1``, ``true``, ``yes`` or ``on`` turn it on.
    """

    __slots__ = ("default", "env", "flag", "help", "switch")

    def __init__(self, env: str, flag: str, help: str, default: str, switch: bool = False) -> None:
        self.env, self.flag, self.help, self.default, self.switch = env, flag, help, default, switch

    def __repr__(self) -> str:
        return f"<Setting {self.env} {self.flag}>"

    def raw(self) -> str | None:
        """The variable's value now, or None when it is unset or empty."""
        return os.environ.get(self.env) or None

    def set_but_blank(self) -> bool:
        """Whether the variable is set, to nothing but blanks (a mistake for some settings)."""
        value = os.environ.get(self.env)
        return value is not None and not value.strip()

    def get(self, given: _T | None = None) -> _T | str | None:
        """``given`` when it is not None, else the variable's value (None when unset)."""
        return given if given is not None else self.raw()

    def on(self, given: bool | None = None) -> bool:
        """For a switch: ``given`` when it is not None, else whether the variable turns it on."""
        if given is not None:
            return given
        return (self.raw() or "").strip().lower() in _ON

    def seconds(self, given: float | None = None) -> float:
        """For a duration: ``given`` when it is not None, else the variable's, else the default.

        Raises:
            ValueError: The value is not a number of seconds above 0 (says which setting).
        """
        value: float | str = given if given is not None else (self.raw() or self.default)
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            msg = f"{self.flag} / {self.env} must be a number of seconds above 0, got {value!r}"
            raise ValueError(msg)
        return seconds


CACHE_DIR = Setting(
    "NEXABIND_CACHE_DIR", "--cache-dir", "Cache folder of the installed libraries",
    "the user cache folder",
)  # fmt: skip
BASE_URL = Setting(
    "NEXABIND_BASE_URL", "--base-url",
    "Release host or mirror laid out as <base>/<release>/<asset>, https:// or file://",
    pin.DEFAULT_BASE_URL,
)  # fmt: skip
OFFLINE = Setting("NEXABIND_OFFLINE", "--offline", "Never touch the network", "off", switch=True)
ALLOW_HTTP = Setting(
    "NEXABIND_ALLOW_HTTP", "--allow-http", "Allow plain http:// to hosts other than loopback",
    "off", switch=True,
)  # fmt: skip
DOWNLOAD_TIMEOUT = Setting(
    "NEXABIND_DOWNLOAD_TIMEOUT", "--download-timeout",
    "Seconds one artifact download may take from its first request to its last byte (a"
    " manifest read gets at most 120 of them)",
    "1800",
)  # fmt: skip
VARIANT = Setting(
    "NEXABIND_VARIANT", "--variant", "cpu, cuda, vulkan or metal",
    "the best variant for this machine",
)  # fmt: skip
CPU_VARIANT = Setting(
    "NEXABIND_CPU_VARIANT", "--cpu-variant",
    "ggml CPU variant to load (x64, haswell, zen4, ...) instead of the usual choice",
    "the variant the install checked, else ggml's best for this CPU",
)  # fmt: skip
LIB_PATH = Setting(
    "NEXABIND_LIB_PATH", "--lib-path", "Library folder to use instead of the cache (a local build)",
    "none: the library installed in the cache",
)  # fmt: skip
BUILD_CACHE = Setting(
    "NEXABIND_BUILD_CACHE", "--build-cache", "Build cache folder (source trees and builds)",
    "the user cache's builds folder",
)  # fmt: skip
LLAMA_SOURCE = Setting(
    "NEXABIND_LLAMA_SOURCE", "--source", "llama.cpp source tree to build instead of the pinned one",
    "the pinned source, fetched into the build cache",
)  # fmt: skip
LLAMA_SDIST = Setting(
    "NEXABIND_LLAMA_SDIST", "--sdist",
    f"Local {pin.SDIST_FILE} to take the pinned source from",
    "pip download, when git and the archive cannot be reached",
)  # fmt: skip

#: ``nexabind serve``'s keys (its own --help names the variable; ``nexabind info`` does not).
API_KEY = Setting(
    "NEXABIND_API_KEY", "--api-key", "A key requests to nexabind serve must carry",
    "none: every client is let in",
)  # fmt: skip

#: Every setting, in the order ``nexabind info`` lists them.
SETTINGS = (
    CACHE_DIR,
    BASE_URL,
    OFFLINE,
    ALLOW_HTTP,
    DOWNLOAD_TIMEOUT,
    LIB_PATH,
    VARIANT,
    CPU_VARIANT,
    BUILD_CACHE,
    LLAMA_SOURCE,
    LLAMA_SDIST,
)
