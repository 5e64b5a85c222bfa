"""Errors that end a job, and the exit codes CONTRACT.md fixes for them."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad arguments, config or input data: the job stops with exit code 2 and writes nothing
    (except a rejects table). The message names the file, key, column or row at fault."""
