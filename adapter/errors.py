"""The project's error type, and the one way an exception from a library becomes part of a one-line message."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable


class AdapterError(Exception):
    """A user-facing error: one line naming the file (and line) and the problem. The CLI prints it, no traceback."""


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """The one overwrite guard of every writer: an existing ``path`` is replaced only when ``force`` is given."""
    if not force and os.path.lexists(path):
        raise AdapterError(f"{path}: already exists; pass --force (force=True in Python) to replace it")


def one_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-blank line of ``exc``'s message, at most ``limit`` characters; its type name when it has none.

    Libraries (hub, transformers, FAISS, store clients, HTTP) raise many types with multi-line messages; a user needs
    one line of reason inside our own message (``f"{path}: cannot load model ({one_line(e)})"``).
    """
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (text or type(exc).__name__)[:limit]


SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)  # env vars we mask
SECRET_SHAPES = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"),  # an Authorization header's token
    re.compile(r"(?i)((?:api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]{4,}"),  # key=value
    re.compile(r"\b(sk-|hf_|ghp_|xox[abp]-)[A-Za-z0-9_-]{8,}"),  # OpenAI, Hugging Face, GitHub, Slack key shapes
)
MASK = "***"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret masked: the given ``secrets``, the values of environment variables whose names
    end in KEY, TOKEN, SECRET or PASSWORD, and anything shaped like a bearer token or an API key.

    Every message the CLI prints or logs goes through this: a server that echoes the key in its 401 body must not
    put it on a terminal, in a CI log or in a bug report.
    """
    known = {s for s in secrets if s and len(s) >= 6}
    known |= {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 6}
    for secret in sorted(known, key=len, reverse=True):  # longest first: a key that contains another
        text = text.replace(secret, MASK)
    for shape in SECRET_SHAPES:
        text = shape.sub(lambda m: m.group(1) + MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets (``redact``) in every record it passes, arguments included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
