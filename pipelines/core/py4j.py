"""What failed inside Spark, by name rather than by searching an error's text.

A failure in the JVM reaches Python as a Py4JJavaError (its `java_exception` and that exception's
causes), or, for SQL calls, as a pyspark.errors exception converted from it (its JVM origin kept).
A failure of a Python task (a block or cell that cannot be built, a row the model cannot score)
travels inside the JVM as org.apache.spark.api.python.PythonException, whose message is the task's
Python traceback: its last line names the exception the task raised. Jobs turn some of those into
user errors, retry others (a Delta commit conflict) or rebuild data (a missing block); this module
is the one place that reads those chains.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

TRACEBACK = "Traceback (most recent call last):"
_MAX_CAUSES = 64   # a Java cause chain is finite, but a self-cycle must not hang the driver


class TaskError(NamedTuple):
    """The Python exception a Spark task raised: its class name as the traceback prints it
    (qualified by module, e.g. udfs.data.blocks.BlockError) and the first line of its message."""

    name: str
    message: str

    @property
    def simple_name(self) -> str:
        return self.name.rpartition(".")[2]


def _python_chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during, and a converted pyspark exception's
    converted cause."""
    todo: list[Any] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "_cause", None)]


def _java_chain(exc: BaseException) -> Iterator[Any]:
    """The Java exceptions behind `exc`, outermost first, each followed by its causes."""
    for e in _python_chain(exc):
        java = getattr(e, "java_exception", None) or getattr(e, "_origin", None)
        for _ in range(_MAX_CAUSES):
            if java is None:
                break
            yield java
            java = java.getCause()


def java_classes(exc: BaseException) -> list[str]:
    """Fully qualified class names of the Java exceptions behind `exc` (outermost first)."""
    return [java.getClass().getName() for java in _java_chain(exc)]


def _raised_in(traceback: str) -> TaskError | None:
    """The exception line of the last traceback in `traceback` (after its indented frames)."""
    if TRACEBACK not in traceback:
        return None
    for line in traceback.rsplit(TRACEBACK, 1)[1].splitlines()[1:]:
        if line and not line[0].isspace():
            name, _, message = line.partition(": ")
            return TaskError(name.strip(), message.strip())
    return None


def task_error(exc: BaseException) -> TaskError | None:
    """The Python exception a Spark task raised, behind `exc`; None when no task failed in Python."""
    texts = [java.getMessage() or "" for java in _java_chain(exc)]
    texts += [str(e) for e in _python_chain(exc)]   # a converted PythonException keeps it as text
    for text in texts:
        found = _raised_in(text)
        if found is not None:
            return found
    return None


def names(exc: BaseException) -> set[str]:
    """Every exception class name behind `exc`, qualified and simple: the Python exceptions on the
    driver, the Java exceptions and the Python exception a task raised."""
    qualified = [f"{type(e).__module__}.{type(e).__qualname__}" for e in _python_chain(exc)]
    qualified += java_classes(exc)
    err = task_error(exc)
    if err is not None:
        qualified.append(err.name)
    return {n for q in qualified for n in (q, q.rpartition(".")[2])}


def raised(exc: BaseException, name: str) -> bool:
    """Whether an exception of class `name` (simple, like "BlockMissing", or qualified) is behind
    `exc`: raised on the driver, in the JVM or by a Spark task."""
    return name in names(exc)


def task_message(exc: BaseException, name: str) -> str | None:
    """The message of the exception of class `name` a Spark task raised, or None when the task
    raised something else (or no task failed)."""
    err = task_error(exc)
    return err.message if err is not None and name in (err.name, err.simple_name) else None
