"""llama.cpp's RPC backend: devices of other machines over TCP, and this machine's served.

The client side (:func:`rpc_devices`) asks the ``RPC`` backend module for a server's devices;
a model given them (``Model(rpc_servers=...)``) spreads its layers over the local and remote
devices as llama.cpp's ``--rpc`` does. The server side (:func:`serve`) is what llama.cpp's
``rpc-server`` program runs: ``ggml_backend_rpc_start_server`` of the same library, so client
and server always speak the same protocol version (:func:`protocol`).

The protocol has no authentication and no encryption: trusted networks only. A server that
goes away while a model uses it ends the client process (ggml aborts on a lost connection);
each endpoint is greeted here first (:func:`greet`), since ggml also aborts on a server it
cannot reach, one that answers garbage, or one of another protocol version.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

from nexabind import loader
from nexabind._ffi import ffi
from nexabind.errors import LibraryNotFoundError, RpcError
from nexabind.lowlevel._lib import ggml

__all__ = [
    "check_endpoint",
    "endpoints",
    "greet",
    "model_devices",
    "protocol",
    "rpc_devices",
    "serve",
]

_lock = threading.Lock()
_servers: dict[str, list[Any]] = {}  # endpoint -> its devices, added once per process

# The greeting, as ggml-rpc.cpp's negotiate_hello sends it: | cmd (1 byte) | size (uint64) |
# rpc_msg_hello_req (conn_caps[24]) |; all-zero caps ask for plain TCP. The answer is
# | size (uint64) = 28 | major | minor | patch | padding | conn_caps[24] |. Little-endian, as
# ggml writes its host's integers and every platform it builds for is little-endian.
_CMD_HELLO = 14
_CAPS_SIZE = 24
_HELLO = struct.pack("<BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE)
_HELLO_RSP_SIZE = 4 + _CAPS_SIZE


def _reg() -> Any:
    reg = ggml().ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        msg = (
            "this llama.cpp library has no RPC backend (libggml-rpc); install a build with it: "
            "`nexabind fetch --force` (release r2 and later) or `nexabind build --install`"
        )
        raise LibraryNotFoundError(msg)
    return reg


def _proc(name: str, ctype: str) -> Any:
    ptr = ggml().ggml_backend_reg_get_proc_address(_reg(), name.encode())
    if ptr == ffi.NULL:
        msg = f"the RPC backend of this library lacks {name}; reinstall it with `nexabind fetch`"
        raise LibraryNotFoundError(msg)
    return ffi.cast(ctype, ptr)


def _devices_of(reg: Any) -> list[Any]:
    G = ggml()
    return [G.ggml_backend_reg_dev_get(reg, i) for i in range(G.ggml_backend_reg_dev_count(reg))]


def endpoints(rpc_servers: Sequence[str] | str | None) -> list[str]:
    """``rpc_servers`` as a list of ``host:port``: a list, or llama-cpp-python's one
    comma-separated string; each checked (:func:`check_endpoint`).

    Raises:
        ValueError: An endpoint is not ``host:port``.
    """
    if rpc_servers is None:
        return []
    if isinstance(rpc_servers, str):
        rpc_servers = [s.strip() for s in rpc_servers.split(",") if s.strip()]
    found = list(rpc_servers)
    for endpoint in found:
        check_endpoint(endpoint)
    return found


def check_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` split and checked (a port in 1..65535).

    Raises:
        ValueError: Not ``host:port``.
    """
    if not isinstance(endpoint, str):
        msg = f"an RPC server is a 'HOST:PORT' string, got {endpoint!r}"
        raise TypeError(msg)
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"an RPC server is HOST:PORT (e.g. 192.168.1.7:50052), got {endpoint!r}"
        raise ValueError(msg)
    return host.strip("[]"), int(port)


def _recv_exactly(sock: socket.socket, n: int, timeout: float) -> bytes:
    """Up to ``n`` bytes (fewer if the peer closes), within ``timeout`` seconds in all: a peer
    that trickles bytes cannot stretch it.

    Raises:
        TimeoutError: The deadline passed first.
    """
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _version(text: str) -> tuple[int, int, int] | None:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def greet(endpoint: str, timeout: float = 5.0) -> str:
    """Say HELLO to the RPC server at ``endpoint`` as ggml's client does, and check its answer.

    The server's protocol version must have this library's major version and no newer minor
    one (ggml's own rule, which it enforces by aborting the process). The connection is closed
    afterwards: a server serves one client at a time, and ggml connects next.

    Args:
        endpoint: ``host:port``.
        timeout: Seconds allowed for connecting and for the answer.

    Returns:
        The server's protocol version, ``major.minor.patch``.

    Raises:
        ValueError: ``endpoint`` is not ``host:port``.
        RpcError: Nothing accepts the connection, the peer does not answer the greeting within
            ``timeout`` or answers garbage (not an RPC server), or it speaks another protocol
            version.
    """
    host, port = check_endpoint(endpoint)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        msg = (
            f"RPC server {endpoint} does not answer ({e}); start it there with "
            "`nexabind rpc-server --host HOST --port PORT`"
        )
        raise RpcError(msg) from e
    with sock:
        try:
            sock.sendall(_HELLO)
            answer = _recv_exactly(sock, 8 + _HELLO_RSP_SIZE, timeout)
        except TimeoutError as e:
            msg = (
                f"{endpoint} accepted a connection but did not answer the RPC greeting within "
                f"{timeout:g} s: not an RPC server, or one busy with another client"
            )
            raise RpcError(msg) from e
        except OSError as e:
            msg = f"{endpoint} dropped the RPC greeting ({e}): not an RPC server?"
            raise RpcError(msg) from e
    if len(answer) < 8 + _HELLO_RSP_SIZE or struct.unpack_from("<Q", answer)[0] != _HELLO_RSP_SIZE:
        msg = (
            f"{endpoint} is not an RPC server: its answer to the greeting is "
            f"{answer[:16]!r}{'...' if len(answer) > 16 else ''}, not a protocol version"
        )
        raise RpcError(msg)
    major, minor, patch = answer[8], answer[9], answer[10]
    theirs = f"{major}.{minor}.{patch}"
    ours = _version(protocol())
    if ours is not None and (major != ours[0] or minor > ours[1]):
        msg = (
            f"RPC server {endpoint} speaks protocol {theirs}, this library {protocol()}: run "
            "`nexabind rpc-server` there from the same nexabind release as here"
        )
        raise RpcError(msg)
    return theirs


def protocol() -> str:
    """The RPC protocol version this library speaks, from its ``abi.json``, or ``unknown``."""
    libdir = loader.loaded_dir()
    path = loader.abi_file(libdir) if libdir is not None else None
    try:
        return (
            str(json.loads(path.read_text()).get("rpc_protocol") or "unknown")
            if path
            else "unknown"
        )
    except (OSError, ValueError):
        return "unknown"


def rpc_devices(endpoints: Sequence[str], timeout: float = 5.0) -> list[Any]:
    """The devices of each RPC server, in order (``ggml_backend_dev_t`` handles).

    Each endpoint is first greeted (:func:`greet`) within ``timeout`` seconds: ggml aborts the
    process on a server it cannot reach, that answers garbage, or of another protocol version.

    Raises:
        ValueError: An endpoint is not ``host:port``.
        RpcError: A server does not answer, is not an RPC server, speaks another protocol
            version, or has no devices.
        LibraryNotFoundError: The library has no RPC backend.
    """
    found: list[Any] = []
    for endpoint in endpoints:
        host, port = check_endpoint(endpoint)
        with _lock:
            if endpoint not in _servers:
                greet(endpoint, timeout)
                add = _proc("ggml_backend_rpc_add_server", "ggml_backend_reg_t (*)(const char *)")
                reg = add(endpoint.encode())
                devs = _devices_of(reg) if reg != ffi.NULL else []
                if not devs:
                    msg = f"RPC server {endpoint} offers no device (protocol {protocol()} here)"
                    raise RpcError(msg)
                _servers[endpoint] = devs
            found += _servers[endpoint]
    return found


def model_devices(rpc_servers: Sequence[str]) -> list[Any]:
    """The devices a model with ``rpc_servers`` spreads over: this machine's GPUs (what
    llama.cpp takes by default) and then every server's, in order. The CPU is always there."""
    G = ggml()
    local = []
    for i in range(G.ggml_backend_dev_count()):
        dev = G.ggml_backend_dev_get(i)
        kind = G.ggml_backend_dev_type(dev)
        name = ffi.string(G.ggml_backend_reg_name(G.ggml_backend_dev_backend_reg(dev)))
        if (
            kind in (G.GGML_BACKEND_DEVICE_TYPE_GPU, G.GGML_BACKEND_DEVICE_TYPE_IGPU)
            and name != b"RPC"
        ):
            local.append(dev)
    return local + rpc_devices(rpc_servers)


def serve(
    endpoint: str,
    *,
    devices: Sequence[str] = (),
    n_threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Serve this machine's devices to RPC clients at ``endpoint``; returns only on error.

    Args:
        endpoint: ``host:port`` to listen on.
        devices: Device names (``CPU``, ``CUDA0``, ...; see ``nexabind info``); default: the
            first GPU, else the CPU.
        n_threads: CPU threads for the CPU device (default: the cores).
        cache_dir: Where clients' tensors are cached by hash between connections (``--cache``).

    Raises:
        ValueError: A device name that this machine has not.
        RpcError: The server could not start (the port is taken, say).
    """
    check_endpoint(endpoint)
    G = ggml()
    every = [G.ggml_backend_dev_get(i) for i in range(G.ggml_backend_dev_count())]
    by_name = {ffi.string(G.ggml_backend_dev_name(d)).decode(): d for d in every}
    if devices:
        unknown = [d for d in devices if d not in by_name]
        if unknown:
            msg = f"no device {', '.join(unknown)} here; this machine has {', '.join(by_name)}"
            raise ValueError(msg)
        chosen = [by_name[d] for d in devices]
    else:
        gpu = G.ggml_backend_dev_by_type(G.GGML_BACKEND_DEVICE_TYPE_GPU)
        chosen = [
            gpu if gpu != ffi.NULL else G.ggml_backend_dev_by_type(G.GGML_BACKEND_DEVICE_TYPE_CPU)
        ]
    start = _proc(
        "ggml_backend_rpc_start_server",
        "void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *)",
    )
    array = ffi.new("ggml_backend_dev_t[]", chosen)
    cache = ffi.new("char[]", os.fsencode(cache_dir)) if cache_dir is not None else ffi.NULL
    start(endpoint.encode(), cache, n_threads or os.cpu_count() or 1, len(chosen), array)
    msg = f"the RPC server at {endpoint} stopped (is the port taken?)"
    raise RpcError(msg)
