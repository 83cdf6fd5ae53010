"""The error every command raises for a problem the user can fix: printed as one line, exit code 2.

Its own module, so that a command can raise it without importing the
command-line entry point (study/cli.py catches it, with cnnlib's CnnlibError).
"""


class UserError(Exception):
    """Raised by commands for problems the user can fix; printed as one line."""
