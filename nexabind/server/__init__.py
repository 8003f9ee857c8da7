"""An OpenAI-compatible HTTP server in front of an engine (``pip install nexabind[server]``).

::

    from nexabind.server import ServeOptions, serve
    serve(ServeOptions("model.gguf", port=8080, parallel=4))

The app (:mod:`~nexabind.server.app`: routes, OpenAI's conventions), the gateway
(:mod:`~nexabind.server.gateway`: keys, the bounded queue, state, metrics) and the supervisor
(:mod:`~nexabind.server.supervisor`: a spawned llama-server as the second engine).
"""

from __future__ import annotations

from nexabind.server._options import ENGINES, ServeOptions
from nexabind.server.app import create_app, serve

__all__ = ["ENGINES", "ServeOptions", "create_app", "serve"]
