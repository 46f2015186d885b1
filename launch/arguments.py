"""The argument parser every ``moeforge`` command uses: full option names, one-line errors.

    parser = ArgumentParser(prog="moeforge train", description="...")

Two differences from ``argparse.ArgumentParser``: an abbreviated option is not taken for the
option it starts (``--resum`` is not ``--resume``: a typo must not silently turn into
another flag), and a bad command line is reported like every other user error, in one line
(``moeforge: error: ...``, once across ranks) with exit status 2, instead of the usage block.
``--help`` works as usual.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from launch.log import print_user_error

USER_ERROR_STATUS = 2  # the status of every moeforge user error (launch/cli.py)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``allow_abbrev=False`` whose errors are one line and status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Print the parse error as one line naming the command and its help; exit 2."""
        print_user_error(f"{self.prog}: {message}; see {self.prog} --help")
        raise SystemExit(USER_ERROR_STATUS)
