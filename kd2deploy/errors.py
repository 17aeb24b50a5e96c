"""User-facing errors: one paragraph, exit code 2, no traceback."""
from __future__ import annotations


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
