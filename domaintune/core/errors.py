"""The project's error types: each becomes one line naming file, row and field (exit 2)."""
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

