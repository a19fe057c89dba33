"""Errors meant for people: the CLI prints their message on one line and exits with code 2."""


class QpipeError(Exception):
    """Bad input or configuration: say what was wrong, with the value, and what to do instead."""
