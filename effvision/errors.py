"""Exceptions a user can act on."""


class UserError(Exception):
    """A mistake in the user's input (file, option, checkpoint). The CLI prints it as one line."""
