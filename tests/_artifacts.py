"""The real release artifact on a mirror folder, and what a test asks of the cache afterwards.

``release_mirror`` (conftest) is ``<root>/<release>/`` holding the artifact that ``nexabind
build --out`` made and its manifest; these read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from _server import Server

from nexabind import pin


def manifest(mirror: Path) -> dict:
    """The mirror's ``manifest.json``."""
    return json.loads((mirror / pin.RELEASE / "manifest.json").read_text())


def entry(mirror: Path) -> dict:
    """The manifest entry of the one artifact."""
    (only,) = manifest(mirror)["artifacts"]
    return only


def archive(mirror: Path) -> Path:
    """The artifact file."""
    return mirror / pin.RELEASE / entry(mirror)["url"]


def asset(mirror: Path) -> str:
    """The artifact's URL path on a server of the mirror."""
    return f"/{pin.RELEASE}/{entry(mirror)['url']}"


def leftovers(cache_root: Path) -> list[str]:
    """What is left in the cache's ``downloads/`` and ``tmp/``."""
    found = []
    for sub in ("downloads", "tmp"):
        folder = cache_root / sub
        found += [p.name for p in folder.iterdir()] if folder.is_dir() else []
    return found


def served(server: Server, path: str) -> int:
    """Bytes of body the server sent for ``path``, over every request."""
    return sum(r.sent for r in server.requests_for(path))
