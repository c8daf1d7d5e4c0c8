"""The project's error types: each is one line for the user (file, row and field; the params key; why a stage
refused) and exit code 2, never a traceback."""
from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""

    def __init__(self, file: str | os.PathLike, row: int | str | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = [f"{file}"]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {problem}")


def missing_column(file: str | os.PathLike, column: str, found, hint: str = "") -> DataError:
    """The one wording of a missing column, for every reader (ingest, predict, monitor, ...)."""
    return DataError(file, None, column, f"column missing; columns found: {list(found)}{hint}")


class ParamsError(ValueError):
    """A params.yaml section has an unknown key or a bad value."""


class StageError(RuntimeError):
    """A stage refused to continue (e.g. a failed quality gate); the message says why."""
