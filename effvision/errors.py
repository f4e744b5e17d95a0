"""Exceptions a user can act on."""


class UserError(Exception):
    """A mistake in the user's input (file, option, checkpoint). The CLI prints it as one line."""


def names_for_message(names: list[str], shown: int = 20) -> str:
    """``names`` for a message: at most ``shown`` of them, then how many there are (a crafted run may hold 900000)."""
    if len(names) <= shown:
        return str(list(names))
    return f"[{', '.join(repr(name) for name in names[:shown])}, ... ({len(names)} in all)]"
