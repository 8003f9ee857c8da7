"""Tools some tests need (linters, a second C library): skipped here, a failure in CI."""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))


def require(present: bool, what: str) -> None:
    """Skip the test when ``present`` is false, saying ``what`` to install; in CI, fail.

    ``.ci/run`` installs every tool the suite needs, so a missing one there is a broken run,
    not a test to leave out.
    """
    if present:
        return
    if IN_CI:
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(what)
