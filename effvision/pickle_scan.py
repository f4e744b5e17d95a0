"""A pass over a pickle's opcodes, run before any unpickler sees it, that bounds what unpickling can cost.

``torch.load(weights_only=True)`` and effvision's allow-list unpickler refuse code, but not cost. Measured on
crafted files before this pass existed (or before each of its rules):

* a 300 kB dict key nested 300,000 tuples deep overflowed the C stack while the dict hashed it (a segfault);
* a 993-byte key of tuples built from memo references, ``t_i = (t_{i-1}, t_{i-1})``, made that hash touch 2^40
  tuples (a hang that ignored SIGTERM), and 200,000 small dicts keyed by one shared value of 2^22 parts rehashed
  it each time (hours);
* 31 chained ``_codecs.encode(x, "hex")`` calls doubled a string 31 times (4.7 GB from a few hundred bytes);
* a memo index of 2^28 made the C unpickler allocate and zero 2 GB for its memo array;
* a callable that is a long string, or a long global name, went into an error message that torch searches with
  a quadratic regular expression (hours at 1 MB).

:func:`check_pickle_cost` follows the pickle machine's stack and memo without building any object. Every value
gets its nesting depth and its *expanded* size (counted once per reference; a string or bytes value counts one
part per 16 characters). It refuses, each a bound no checkpoint comes near (a ViT-B state dict: depth 4, about
5000 parts, 20,000 opcodes):

* a depth over :data:`MAX_DEPTH`, a value over :data:`MAX_EXPANDED_PARTS`, or a pickle whose values add up to
  more than :data:`MAX_TOTAL_PARTS` (each value counted when it is built, each item when it is added: the work
  of hashing and copying them), or more than :data:`MAX_OPCODES` opcodes;
* a call (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``OBJ``, ``INST``) of anything but a named global, a global
  name that is no dotted Python name of at most 200 characters, and ``_codecs.encode`` with an encoding other
  than ``latin1`` (the one ``torch.save`` writes);
* a memo index beyond the opcodes read so far (pickle's writer numbers them from 0);
* a container changed after a second reference to it was taken (only a cycle needs that), since its size
  would be counted short.
"""

from __future__ import annotations

import pickletools
import re
from typing import IO

from effvision.errors import UserError

MAX_DEPTH = 100
MAX_EXPANDED_PARTS = 1 << 24
MAX_TOTAL_PARTS = 1 << 26
MAX_OPCODES = 1 << 21
MAX_GLOBAL_NAME = 200
CHARACTERS_PER_PART = 16

_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class _Node:
    """A value on the simulated stack: its nesting depth and expanded size; for strings their text, for globals
    ``(module, name)``, for tuples their items (what the call checks read)."""

    __slots__ = ("depth", "size", "shared", "value", "items")

    def __init__(self, depth: int = 0, size: int = 1, value=None, items: tuple | None = None) -> None:
        self.depth, self.size, self.shared, self.value, self.items = depth, size, False, value, items


_MARK = object()


def check_pickle_cost(data: bytes | IO[bytes], source: str) -> None:
    """:class:`UserError` naming ``source`` unless unpickling ``data`` stays within this module's bounds."""
    stack: list = []
    memo: dict = {}
    total = 0

    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what}; no checkpoint is built like that, and unpickling it could crash or hang")

    def charge(parts: int) -> None:
        nonlocal total
        total += parts
        if total > MAX_TOTAL_PARTS:
            raise refuse(f"its pickle builds more than {MAX_TOTAL_PARTS} parts in all (through shared references)")

    def built(node: _Node) -> _Node:
        if node.depth > MAX_DEPTH:
            raise refuse(f"its pickle nests values more than {MAX_DEPTH} deep")
        if node.size > MAX_EXPANDED_PARTS:
            raise refuse(f"its pickle builds a value of more than {MAX_EXPANDED_PARTS} parts (through shared "
                         "references)")
        charge(node.size)
        return node

    def global_node(module, name) -> _Node:
        for part in (module, name):
            if not isinstance(part, str) or len(part) > MAX_GLOBAL_NAME or not _DOTTED_NAME.fullmatch(part):
                raise refuse(f"its pickle names a global {str(part)[:40]!r}... that is no Python name")
        return _Node(value=(module, name))

    def check_call(name: str, function: _Node, arguments: _Node | None) -> None:
        if not isinstance(function.value, tuple):
            raise refuse(f"its pickle calls ({name}) something that is not a named global")
        if function.value == ("_codecs", "encode"):
            items = arguments.items if arguments is not None else None
            if items is None or len(items) != 2 or items[1].value != "latin1":
                raise refuse("its pickle calls _codecs.encode with another encoding than latin1")

    def pop_to_mark() -> list:
        items = []
        while stack:
            item = stack.pop()
            if item is _MARK:
                return items
            items.append(item)
        raise refuse("its pickle is malformed (no mark)")

    def pop(count: int) -> list:
        if len(stack) < count:
            raise refuse("its pickle is malformed (stack underflow)")
        items = stack[len(stack) - count:]
        del stack[len(stack) - count:]
        if any(item is _MARK for item in items):
            raise refuse("its pickle is malformed (a mark where a value belongs)")
        return items

    def combined(children: list, **extra) -> _Node:
        return built(_Node(1 + max((child.depth for child in children), default=-1),
                           1 + sum(child.size for child in children), **extra))

    try:
        for count, (opcode, argument, position) in enumerate(pickletools.genops(data)):
            if count >= MAX_OPCODES:
                raise refuse(f"its pickle has more than {MAX_OPCODES} opcodes")
            name = opcode.name
            if name == "STOP":
                return
            if name in ("PROTO", "FRAME"):
                continue
            if name == "MARK":
                stack.append(_MARK)
            elif name in _PUT or name == "MEMOIZE":
                index = len(memo) if name == "MEMOIZE" else argument
                if not isinstance(index, int) or index > count:  # the C unpickler sizes its memo array by it
                    raise refuse(f"its pickle stores memo entry {index} after {count} opcodes")
                if not stack or stack[-1] is _MARK:
                    raise refuse("its pickle is malformed (nothing to store)")
                memo[index] = stack[-1]
            elif name in _GET:
                node = memo.get(argument)
                if node is None:
                    raise refuse("its pickle is malformed (a memo entry that was never stored)")
                node.shared = True
                stack.append(node)
            elif name == "DUP":
                if not stack or stack[-1] is _MARK:
                    raise refuse("its pickle is malformed (stack underflow)")
                stack[-1].shared = True
                stack.append(stack[-1])
            elif name == "POP":
                if stack and stack[-1] is _MARK:  # POP of a mark drops it
                    stack.pop()
                else:
                    pop(1)
            elif name == "POP_MARK":
                pop_to_mark()
            elif name == "GLOBAL":
                module, _, attribute = str(argument).partition(" ")
                stack.append(global_node(module, attribute))
            elif name == "STACK_GLOBAL":
                module, attribute = pop(2)
                stack.append(global_node(module.value, attribute.value))
            elif name == "INST":
                module, _, attribute = str(argument).partition(" ")
                global_node(module, attribute)
                stack.append(combined(pop_to_mark()))
            elif isinstance(argument, str | bytes | bytearray) and not opcode.stack_before:  # a string constant
                text = argument if isinstance(argument, str) else None
                stack.append(built(_Node(size=1 + len(argument) // CHARACTERS_PER_PART, value=text)))
            elif name in _CALLS:
                if name == "OBJ":
                    children = pop_to_mark()[::-1]  # stack order: the class first
                    if not children:
                        raise refuse("its pickle is malformed (OBJ without a class)")
                    check_call(name, children[0], None)
                else:
                    children = pop(3 if name == "NEWOBJ_EX" else 2)
                    check_call(name, children[0], children[1])
                stack.append(combined(children))
            elif name in _IN_PLACE:
                before = opcode.stack_before
                if pickletools.markobject in before:  # APPENDS, SETITEMS, ADDITEMS: the container below the mark
                    added = pop_to_mark()
                    (container,) = pop(1)
                else:
                    container, *added = pop(len(before))
                added = [child for child in added if child is not container]
                if container.shared and added:
                    raise refuse(f"its pickle changes a value after sharing it ({name} at byte {position})")
                parts = sum(child.size for child in added)
                charge(parts)  # a key is hashed, an item copied: as much work as its expanded size
                container.size += parts
                container.depth = max([container.depth, *(child.depth + 1 for child in added)])
                if container.depth > MAX_DEPTH or container.size > MAX_EXPANDED_PARTS:
                    built(container)
                stack.append(container)
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    children = pop_to_mark()[::-1]
                    children = pop(before.index(pickletools.markobject)) + children
                else:
                    children = pop(len(before))
                if opcode.stack_after:
                    is_tuple = name.startswith("TUPLE") or name == "EMPTY_TUPLE"
                    stack.append(combined(children, items=tuple(children) if is_tuple else None))
    except ValueError as error:  # pickletools: an unknown opcode or a truncated argument
        raise refuse(f"its pickle is malformed ({error})") from None
    raise refuse("its pickle does not end with STOP")
