"""User-facing errors: one clear message, exit code 2, no traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """An error caused by the user's input (recipe, path, flag), not by a bug.

    The CLI prints ``str(err)`` and exits with status 2; the message must name what is
    wrong and how to fix it.
    """

    exit_code = 2


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" — did you mean 'x'?"`` for the closest choice, or ``""``."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" — did you mean '{match[0]}'?" if match else ""


def extra_requirement(extra: str) -> str:
    """The pip requirement that installs one of wbscale's optional extras."""
    return f"wbscale[{extra}]"


def require(module: str, extra: str, feature: str) -> None:
    """A UserError naming the extra to install when ``module`` is not importable."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"{feature} needs the '{module}' package, which is not installed: "
            f"pip install '{extra_requirement(extra)}'"
        )
