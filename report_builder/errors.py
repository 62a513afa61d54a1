"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: a spec, a file, a missing download. The message says what and where."""

    exit_code = 2


class SpecError(UserError):
    """One or more problems in a spec file, each naming its key path."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {p}" for p in problems]
        super().__init__("invalid spec\n" + "\n".join(f"  {line}" for line in lines))
