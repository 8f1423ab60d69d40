"""The project's error type, and the one way an exception from a library becomes part of a one-line message."""

from __future__ import annotations


class AdapterError(Exception):
    """A user-facing error: one line naming the file (and line) and the problem. The CLI prints it, no traceback."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``exc``'s message, at most ``limit`` characters; its type name when it has none.

    Libraries (hub, transformers, FAISS, store clients, HTTP) raise many types with multi-line messages; a user needs
    one line of reason inside our own message (``f"{path}: cannot load model ({one_line(e)})"``).
    """
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (text or type(exc).__name__)[:limit]
