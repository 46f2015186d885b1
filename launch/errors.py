"""The error types ``moeforge`` reports in one line instead of a traceback.

``UserError``: a problem the user caused and can fix; its message names the field, the
value and the fix; the CLI exits with status 2. ``TrainingDiverged``: the loss or the
gradient went non-finite; the run stops before writing a checkpoint from that state and
the CLI exits with status 3 (launch/cli.py). ``first_line`` shortens any error to the one
line such a message quotes.
"""

import re

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """A config, data or command-line problem the user can fix; the message is one line."""


class TrainingDiverged(Exception):
    """A non-finite loss or gradient stopped the run; the message names the step."""


def first_line(err: BaseException) -> str:
    """The error's first line, for a one-line message (gloo's source location and its generic
    advice dropped)."""
    text = next((line for line in str(err).splitlines() if line.strip()), "").strip()
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(" This is typically caused by")[0]
    return text or type(err).__name__
