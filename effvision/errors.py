"""Exceptions a user can act on, and helpers to name untrusted values in their messages."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """A mistake in the user's input (file, option, checkpoint). The CLI prints it as one line."""


def names_for_message(names: list[str], shown: int = 20) -> str:
    """``names`` for a message: at most ``shown`` of them, then how many there are (a crafted run may hold 900000)."""
    if len(names) <= shown:
        return str(list(names))
    return f"[{', '.join(repr(name) for name in names[:shown])}, ... ({len(names)} in all)]"


def short_repr(value: Any, limit: int = 80) -> str:
    """At most ``limit`` characters of ``value``'s repr, built without walking all of it: ``f"{value!r:.80}"``
    builds the whole repr first, which for a value read from a crafted file (a key of shared tuples, a 256 MB
    string) costs time and memory out of all proportion to the message."""
    import reprlib

    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxtuple, short.maxlist, short.maxdict = 3, 4, 4, 4
    short.maxstring = short.maxother = limit
    return short.repr(value)[:limit]
