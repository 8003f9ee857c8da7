"""The public surface is explicit, sorted and importable."""

from __future__ import annotations

import nexabind


def test_all_is_sorted_and_unique() -> None:
    assert list(nexabind.__all__) == sorted(set(nexabind.__all__))


def test_every_exported_name_resolves() -> None:
    for name in nexabind.__all__:
        assert getattr(nexabind, name) is not None, name


def test_unknown_attribute_raises() -> None:
    try:
        nexabind.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
