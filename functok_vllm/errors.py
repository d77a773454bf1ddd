"""Errors that reach a user: the CLI prints their message and exits 2, without a traceback."""


class CLIError(Exception):
    """Bad input to a command (a missing file, a value out of range); the message names the bad value."""
