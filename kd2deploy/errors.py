"""User-facing errors: one paragraph, exit code 2, no traceback."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Bad input from the user (recipe, path, model name, checkpoint). The CLI prints it and exits 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one paragraph, whatever the source formatting


class CheckFailed(Exception):
    """A result failed a check kd2deploy makes (e.g. export parity). The CLI prints it and exits 1."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


class RecipeError(UserError):
    def __init__(self, file: str | None, field: str | None, problem: str, fix: str = ""):
        where = f"Recipe {file}" if file else "Recipe"
        if field:
            where += f", field `{field}`"
        super().__init__(f"{where}: {problem}{' ' + fix if fix else ''}")
        self.file, self.field = file, field


def validation_problems(err: Any, extra_hint: Callable[[tuple], str] | None = None) -> str:
    """A pydantic ValidationError as one sentence of `field `a.b`: what is wrong (got ...)` parts; `extra_hint(loc)`
    adds the known keys to an unknown-key problem."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            problems.append(f"field `{loc}` is not a known key{extra_hint(e['loc']) if extra_hint else ''}")
        elif e["type"] == "missing":
            problems.append(f"field `{loc}` is required but missing")
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
            problems.append(f"field `{loc}`: {e['msg']}{got_text}")
    return "; ".join(problems)
