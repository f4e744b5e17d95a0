"""Messages that name values read from untrusted files stay short and cheap to build."""

from __future__ import annotations

import time

from effvision.errors import names_for_message, short_repr


def _shared_tuple(depth: int) -> tuple:
    value: tuple = ()
    for _ in range(depth):
        value = (value, value)  # 2**depth leaves once expanded: f"{value!r:.80}" would never finish
    return value


def test_short_repr_of_a_shared_structure_is_bounded_and_fast():
    start = time.perf_counter()
    text = short_repr([_shared_tuple(64)])
    assert time.perf_counter() - start < 1.0
    assert text.startswith("[((") and "..." in text and len(text) <= 80


def test_short_repr_truncates_long_strings_and_keeps_small_values():
    assert len(short_repr("x" * 10_000_000)) <= 80
    assert len(short_repr("y" * 10_000, 40)) <= 40
    assert short_repr(3) == "3" and short_repr(None) == "None" and short_repr("lr") == "'lr'"


def test_names_for_message_counts_what_it_leaves_out():
    assert names_for_message(["a", "b"]) == "['a', 'b']"
    text = names_for_message([f"n{i}" for i in range(900_000)])
    assert text.endswith("(900000 in all)]") and len(text) < 300
