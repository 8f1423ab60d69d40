"""The project's error type, the one way an exception from a library becomes part of a one-line message, and the
one way secrets are kept out of messages, logs and written files (``redact``)."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable


class AdapterError(Exception):
    """A user-facing error: one line naming the file (and line) and the problem. The CLI prints it, no traceback."""


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """The one overwrite guard of every writer: an existing ``path`` is replaced only when ``force`` is given."""
    if not force and os.path.lexists(path):
        raise AdapterError(f"{path}: already exists; pass --force (force=True in Python) to replace it")


ONE_LINE_CHARS = 200  # the longest line an error quotes from a library message


def one_line(exc: BaseException | str, limit: int = ONE_LINE_CHARS) -> str:
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
# a URL's password (``scheme://user:password@host``, any scheme): from the user's colon to the netloc's last "@"
URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/?#@:\"'<>\\]*:)[^\s/?#\"'<>\\]*@")
MASK = "***"
MIN_SECRET = 6  # shorter values are not masked by value: masking "none" or "1" everywhere would garble every message

_held: set[str] = set()  # secret values this process holds: keys it read, passwords in URLs and DSNs it was given
_held_envs: set[str] = set()  # names of the variables a key is read from, whatever they are called
_lock = threading.Lock()


def hold_secret(value: str | None) -> None:
    """Mask ``value`` in everything ``redact`` cleans from now on: a key, a password, a token this process holds."""
    if value and len(value) >= MIN_SECRET:
        with _lock:
            _held.add(value)


def hold_secret_env(name: str | None) -> None:
    """Mask the value of ``$name`` from now on, whatever the variable is called: the process reads a key from it."""
    if name:
        with _lock:
            _held_envs.add(name)
        hold_secret(os.environ.get(name))


def hold_url_secrets(url: str | None) -> None:
    """Mask the password of ``url`` (``scheme://user:password@host``) from now on, however a message quotes it."""
    if not url or "@" not in url:
        return
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:  # not parseable (a bracket left open): the URL pattern still masks it in text
        return
    if password:
        hold_secret(password)
        hold_secret(unquote(password))


def strip_credentials(text: str) -> str:
    """``text`` with the password of every URL in it masked (``http://bob:***@host/v1``; the user name stays, as
    a DSN is shown): what a stored config or a printed URL shows."""
    return URL_CREDENTIALS.sub(lambda m: m.group(1) + MASK + "@", text)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret masked: the given ``secrets``; every value the process holds (``hold_secret``:
    keys read from any variable, whatever its name, passwords of URLs and DSNs); the values of environment variables
    whose names end in KEY, TOKEN, SECRET or PASSWORD; the password of any URL; and anything shaped like a bearer
    token or an API key.

    Every message the CLI prints or logs goes through this, and every config written beside an artifact: a server
    that echoes the key in its 401 body must not put it on a terminal, in a CI log, a file or a bug report.
    """
    with _lock:
        known = set(_held) | {os.environ.get(name) or "" for name in _held_envs}
    known |= set(secrets)
    known |= {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    for secret in sorted((s for s in known if s and len(s) >= MIN_SECRET), key=len, reverse=True):  # longest first
        text = text.replace(secret, MASK)
    text = strip_credentials(text)
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
