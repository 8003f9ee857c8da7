"""``nexabind fetch``: make sure the llama.cpp library for this process is installed.

:func:`fetch` chooses the artifact of the release for this platform (:mod:`nexabind.manifest`,
:mod:`nexabind.choice`), downloads it (:mod:`nexabind._download`) and installs it
(:mod:`nexabind.install`) under one file lock per artifact, so that concurrent fetches download
once. When nothing can be downloaded it builds from source (:mod:`nexabind._build`). A fetch of
an installed library touches no network and imports neither ``requests`` nor ``tqdm``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

from nexabind import _build, _download, cache, install, pin, settings, targets
from nexabind import manifest as mf
from nexabind.choice import choose, no_artifact_message
from nexabind.errors import (
    CacheError,
    ChecksumMismatchError,
    DownloadError,
    ManifestError,
    NexabindError,
    UnsafeArchiveError,
)
from nexabind.platform import detect, target

__all__ = ["fetch"]

log = logging.getLogger(__name__)

#: A build for this machine (its best CPU variant and x64) on 2 cores: about 190 CPU-seconds of
#: compiling, plus the source (benchmarks/README.md, "build for this machine").
_BUILD_MINUTES = 3


def _base_url(base_url: str | None) -> str:
    base = settings.BASE_URL.get(base_url) or pin.DEFAULT_BASE_URL
    if "://" not in base:  # a plain folder is a file:// mirror
        base = Path(base).expanduser().resolve().as_uri()
    return base.rstrip("/")


def _build_instead(
    failure: NexabindError,
    variant: str | None,
    release: str,
    root: Path,
    build: bool,
    progress: bool,
) -> Path:
    """Build from source and install (``nexabind build --install``), or raise ``failure``.

    ``failure`` says why nothing can be downloaded; when not building, it is raised with what
    to run added.
    """
    os_name, arch = target()
    if variant is None:
        built = targets.variants_for(os_name, arch)
        variant = next((v for v in targets.variant_order_here() if v in built), "cpu")
    cmd = "nexabind build --install" + (f" --variant {variant}" if variant != "cpu" else "")
    reason = str(failure)
    if not build or release != pin.RELEASE:
        if release != pin.RELEASE:
            hint = f"(only release {pin.RELEASE} can be built from this nexabind's source pin)"
        elif "nexabind build" in reason:  # the no-artifact message offers the build already
            hint = f"(a build takes about {_BUILD_MINUTES} minutes; or set NEXABIND_LIB_PATH)"
        else:
            hint = (
                f"Build it from source with `{cmd}` (about {_BUILD_MINUTES} minutes; needs "
                "CMake and a C++ compiler), or set NEXABIND_LIB_PATH to a local build"
            )
        raise type(failure)(f"{reason}\n{hint}") from failure
    log.warning("%s", reason)
    log.info(
        "building llama.cpp %s (%s) from source instead, as `%s` does; this takes about %d minutes",
        pin.LLAMA_COMMIT, variant, cmd, _BUILD_MINUTES,
    )  # fmt: skip
    import tempfile

    key = targets.key(os_name, arch, variant)
    # Under the artifact's lock: a concurrent fetch waits and then finds the install, and
    # `nexabind clean` leaves the build folder alone (a killed build's folder it removes).
    with cache.file_lock(root, release, key):
        hit = cache.find(release, key, root)
        if hit is not None:
            return hit.lib
        prefix = f"{release}{cache.SEP}{key}{cache.SEP}build-"
        with tempfile.TemporaryDirectory(dir=root / "tmp", prefix=prefix) as out:
            _build.build(variant, out=out, progress=progress, all_variants=False)
            data = json.loads((Path(out) / "manifest.json").read_text())
            entry = next(a for a in data["artifacts"] if a["variant"] == variant)
            archive = Path(out) / entry["name"]
            return install.install_locked(
                root, archive, entry, release, source="nexabind build", force=True, checked=False
            )


def fetch(
    variant: str | None = None,
    *,
    release: str | None = None,
    base_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    force: bool = False,
    build: bool = True,
    progress: bool | None = None,
    allow_http: bool | None = None,
    download_timeout: float | None = None,
) -> Path:
    """Make sure the llama.cpp library for this process is installed, and return its folder.

    ``NEXABIND_LIB_PATH`` wins (nothing is fetched). An installed, complete entry is returned at
    once, without touching the network. Otherwise the release manifest is read (the one shipped
    in the package, else ``<base>/<release>/manifest.json``, said to be unpinned), the best
    artifact for this platform is downloaded, verified and installed. When no artifact fits or
    the host cannot be reached, llama.cpp is built from source unless ``build`` is False.

    Args:
        variant: ``cpu``, ``cuda``, ``vulkan`` or ``metal``; default ``NEXABIND_VARIANT``, else
            the best for this platform.
        release: Release tag; default :data:`nexabind.pin.RELEASE`.
        base_url: Release host or mirror (``<base>/<release>/<asset>``); default
            ``NEXABIND_BASE_URL``, else :data:`nexabind.pin.DEFAULT_BASE_URL`.
        cache_dir: Cache root; default ``NEXABIND_CACHE_DIR``, else the user cache.
        offline: Never touch the network; default ``NEXABIND_OFFLINE``.
        force: Download and reinstall even when installed.
        build: Build from source when nothing can be downloaded.
        progress: Show a progress bar on stderr; default: when stderr is a terminal. Status
            lines go to the ``nexabind`` logger (``nexabind fetch`` prints them).
        allow_http: Allow plain ``http://`` to hosts other than loopback; default
            ``NEXABIND_ALLOW_HTTP``.
        download_timeout: Seconds the artifact's download may take, retries included (the
            manifest read: at most 120 of them); default ``NEXABIND_DOWNLOAD_TIMEOUT``, else
            1800.

    Returns:
        The installed ``lib`` folder (or ``NEXABIND_LIB_PATH``).

    Raises:
        CacheError: Offline and nothing installed; or the cache cannot be written (a full
            disk, its ``tmp/`` on another filesystem), saying what to do.
        ManifestError: No artifact fits and ``build`` is False, or the manifest is invalid
            (or over :data:`nexabind.manifest.MAX_BYTES`).
        DownloadError: The host cannot be reached, or the download ran past its deadline
            (``DownloadTimeoutError``), and ``build`` is False; a checksum mismatch
            (``ChecksumMismatchError``), an unsafe archive (``UnsafeArchiveError``) or a URL
            that may not be followed (a redirect to ``file://``, a ``file://`` URL outside the
            release folder).
        BuildError: The fallback build failed.
        ValueError: ``download_timeout`` (or its variable) is not a number of seconds above 0.
    """
    local = settings.LIB_PATH.get()
    if local:
        log.info("%s is set; using %s, nothing fetched", settings.LIB_PATH.env, local)
        return Path(local)
    release = release or pin.RELEASE
    progress = sys.stderr.isatty() if progress is None else progress
    variant = settings.VARIANT.get(variant)
    offline = settings.OFFLINE.on(offline)
    allow_http = settings.ALLOW_HTTP.on(allow_http)
    deadline = settings.DOWNLOAD_TIMEOUT.seconds(download_timeout)
    root = cache.prepare(cache_dir)
    if not force:
        hit = cache.best_installed(release, root, variant=variant, order=targets.variant_order_here)
        if hit is not None:
            log.info("%s of release %s is installed in %s", hit.key, release, hit.path)
            return hit.lib
    os_name, arch = target()
    if offline:
        what = f"{os_name}-{arch}" + (f"-{variant}" if variant else "")
        msg = (
            f"offline (NEXABIND_OFFLINE / --offline) and no llama.cpp library of release {release}"
            f" for {what} is installed in {root}; run `nexabind fetch` with network access, or "
            "`nexabind build --install`, or set NEXABIND_LIB_PATH to a local build"
        )
        raise CacheError(msg)
    try:
        with contextlib.ExitStack() as stack:  # the children and the HTTP session
            base = _base_url(base_url)
            return _fetch_online(
                variant, release, base, root, force, progress, allow_http, deadline, stack
            )
    except (ChecksumMismatchError, UnsafeArchiveError, _download.URLRefusedError):
        raise
    except _NothingToDownload as e:
        return _build_instead(ManifestError(str(e)), variant, release, root, build, progress)
    except DownloadError as e:  # a DownloadTimeoutError stays one
        failure = type(e)(f"nothing could be downloaded: {e}")
        return _build_instead(failure, variant, release, root, build, progress)


class _NothingToDownload(ManifestError):
    """No artifact of the manifest fits this process (the message says why)."""


def _fetch_online(
    variant: str | None,
    release: str,
    base: str,
    root: Path,
    force: bool,
    progress: bool,
    allow_http: bool,
    deadline: float,
    stack: contextlib.ExitStack,
) -> Path:
    timeout = (10.0, 30.0)
    folder = f"{base}/{release}"  # a file:// mirror's URLs must stay inside it
    # Two children start first, so that their start-up overlaps importing requests: the one
    # that will smoke-load the new library, and the GPU probe (which detect() runs).
    smoke = stack.enter_context(install.smoke_child())
    probe = threading.Thread(target=detect, daemon=True)
    probe.start()
    # One session for the manifest and the artifact: one connection (and TLS handshake) per host.
    session = None if base.startswith("file:") else stack.enter_context(_download.open_session())
    manifest = mf.packaged(release)
    if manifest is None:
        url = f"{folder}/manifest.json"
        data = _download.read_manifest(
            url, allow_http, timeout, session, limit=mf.MAX_BYTES, root=folder,
            deadline=min(deadline, _download.MANIFEST_DEADLINE),
        )  # fmt: skip
        manifest = mf.Manifest.from_json(data, pinned=False, source=url)
        log.info("using the unpinned manifest %s (digests not shipped with nexabind)", url)
    mf.check_compatible(manifest)
    probe.join()
    plat = detect()
    choice = choose(manifest, plat, variant)
    art = choice.artifact
    if art is None:
        raise _NothingToDownload(no_artifact_message(choice, plat))
    if not force:
        hit = cache.find(release, art.key, root)
        if hit is not None:
            log.info("%s of release %s is installed in %s", art.key, release, hit.path)
            return hit.lib
    url = f"{folder}/{art.url}"
    with cache.file_lock(root, release, art.key):
        if not force:
            hit = cache.find(release, art.key, root)
            if hit is not None:  # another process installed it while we waited
                log.info("%s was installed meanwhile in %s", art.key, hit.path)
                return hit.lib
        log.info("downloading %s (%.1f MiB) from %s", art.name, art.size / 2**20, url)
        path = _download.download(
            url,
            root / "downloads",
            size=art.size,
            sha256=art.sha256,
            prefix=f"{release}{cache.SEP}{art.key}{cache.SEP}",
            name=art.name,
            allow_http=allow_http,
            timeout=timeout,
            deadline=deadline,
            root=folder,
            progress=progress,
            session=session,
        )
        try:
            lib = install.install_locked(
                root, path, art, release, source=url, force=True, checked=True, smoke=smoke,
                discard=True,
            )  # fmt: skip
        finally:
            path.unlink(missing_ok=True)
            path.with_name(path.name + ".json").unlink(missing_ok=True)
    log.info("installed %s of release %s in %s", art.key, release, lib.parent)
    return lib
