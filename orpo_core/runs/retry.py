"""Which errors are worth a retry.

A retry helps only when the failure can pass: network errors (connection, timeout), HTTP 429 /
5xx (:func:`orpo_core.publish.hub.is_transient_error`) and CUDA out-of-memory (another process
may free the memory). Everything else is permanent: a bad recipe or data (``RecipeError``,
``DataError``), missing files, permission errors, a full disk, programming errors — a retry
would fail the same way, so the stage fails at once.
"""

from __future__ import annotations


def is_cuda_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA out-of-memory error (``torch.OutOfMemoryError`` or its message)."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError)
        return True
    return isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)


def is_transient(exc: BaseException | None) -> bool:
    """Whether a retry may help, looking at ``exc`` and its causes (see the module docstring)."""
    from orpo_core.publish.hub import is_transient_error

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError, TypeError, KeyError)):
            return False
        if is_cuda_oom(exc) or is_transient_error(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
