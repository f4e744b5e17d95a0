"""A pass over a pickle's opcodes, run before any unpickler sees it, that bounds what unpickling can cost.

``torch.load(weights_only=True)`` and effvision's allow-list unpickler refuse code, but not cost: a 300 kB pickle
of a key nested 300,000 tuples deep overflowed the C stack while the dict hashed it (a segfault), and a 993-byte
pickle of tuples built from memo references, ``t_i = (t_{i-1}, t_{i-1})``, made that hash touch 2^40 tuples (a hang
that ignored SIGTERM). :func:`check_pickle_cost` follows the pickle machine's stack and memo without building
any object, giving every value its nesting depth and its *expanded* size (nodes counted once per reference), and
refuses the pickle when either passes a bound no checkpoint comes near (a ViT-B state dict: depth 4, about 5000
nodes; bounds: depth 100, 2^24 nodes, 2^22 opcodes). A container changed after a second reference to it was
taken is refused too (only a cycle needs that), since its size would be counted short.
"""

from __future__ import annotations

import pickletools
from typing import IO

from effvision.errors import UserError

MAX_DEPTH = 100
MAX_EXPANDED_NODES = 1 << 24
MAX_OPCODES = 1 << 22

_IN_PLACE = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


class _Node:
    __slots__ = ("depth", "size", "shared")

    def __init__(self, depth: int = 0, size: int = 1) -> None:
        self.depth, self.size, self.shared = depth, size, False


_MARK = object()


def check_pickle_cost(data: bytes | IO[bytes], source: str) -> None:
    """:class:`UserError` naming ``source`` unless unpickling ``data`` builds values at most :data:`MAX_DEPTH`
    deep and :data:`MAX_EXPANDED_NODES` large (expanded), in at most :data:`MAX_OPCODES` opcodes."""
    stack: list = []
    memo: dict = {}

    def refuse(what: str) -> UserError:
        return UserError(f"{source}: {what}; no checkpoint is built like that, and unpickling it could crash or hang")

    def check(node: _Node) -> _Node:
        if node.depth > MAX_DEPTH:
            raise refuse(f"its pickle nests values more than {MAX_DEPTH} deep")
        if node.size > MAX_EXPANDED_NODES:
            raise refuse(f"its pickle builds a value of more than {MAX_EXPANDED_NODES} parts (through shared "
                         "references)")
        return node

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
        return [item for item in items if item is not _MARK]

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
            elif name in _PUT:
                memo[argument] = stack[-1] if stack else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in _GET:
                node = memo.get(argument)
                if not isinstance(node, _Node):
                    raise refuse("its pickle is malformed (a memo entry that was never stored)")
                node.shared = True
                stack.append(node)
            elif name == "DUP":
                if not stack or stack[-1] is _MARK:
                    raise refuse("its pickle is malformed (stack underflow)")
                stack[-1].shared = True
                stack.append(stack[-1])
            elif name == "POP":
                pop(1)
            elif name == "POP_MARK":
                pop_to_mark()
            else:
                before = opcode.stack_before
                if pickletools.markobject in before:
                    children = pop_to_mark()
                    children += pop(before.index(pickletools.markobject))
                else:
                    children = pop(len(before))
                if name in _IN_PLACE:
                    if not children:
                        raise refuse("its pickle is malformed (stack underflow)")
                    # the container sits below the items: last popped after a mark, else first in stack order
                    container = children[-1] if pickletools.markobject in before else children[0]
                    added = [child for child in children if child is not container]
                    if container.shared and added:
                        raise refuse(f"its pickle changes a value after sharing it ({name} at byte {position})")
                    container.size += sum(child.size for child in added)
                    container.depth = max([container.depth, *(child.depth + 1 for child in added)])
                    stack.append(check(container))
                elif opcode.stack_after:
                    stack.append(check(_Node(1 + max((child.depth for child in children), default=-1),
                                             1 + sum(child.size for child in children))))
    except ValueError as error:  # pickletools: an unknown opcode or a truncated argument
        raise refuse(f"its pickle is malformed ({error})") from None
    raise refuse("its pickle does not end with STOP")
