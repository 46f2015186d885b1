"""The user-error type: a problem the user caused and can fix.

Its message is one line naming the field, the value and the fix; ``moeforge`` prints it
without a traceback and exits with status 2 (launch/cli.py).
"""


class UserError(Exception):
    """A config, data or command-line problem the user can fix; the message is one line."""
