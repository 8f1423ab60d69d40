"""JSON from untrusted text (a server's reply, a file's header): bounded nesting depth, linear time, no copies.

``json`` alone recurses once per nesting level (10^5 ``[`` is a RecursionError, not a ValueError) and says nothing
about cost; a reply that is prose around JSON is worse: decoding from every ``{`` is quadratic in time, and slicing
the text at each one is quadratic in memory. Here every parse is refused past ``MAX_DEPTH`` levels before it starts,
and the search for JSON inside prose skips what it has already decoded and stops after a fixed multiple of the
text's length in failed attempts. Every refusal is a ``ValueError`` (``DepthError`` when too deep).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

MAX_DEPTH = 64  # nesting levels of any JSON we read: our own files use 5, a chat model's answer 3
SEARCH_BUDGET = 8  # failed decodes inside prose may scan at most this many times the text's length in all
MAX_FAILED = 256  # and at most this many may fail (each also costs a count of the lines before it)
BLOCK = 1 << 20  # characters counted at a time: memory stays bounded whatever the text's size
_OPEN = re.compile(r"[{\[]")
_STRING = re.compile(r'"[^"]*(?:"|\Z)')  # once escapes are gone: a string, closed or running to the end
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


class DepthError(ValueError):
    """JSON nested deeper than allowed."""


def depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside strings in ``text`` (read as JSON from its start), in linear time
    and a bounded amount of memory. A close without its open lowers the count, as it would end a decode."""
    unescaped = text.replace("\\\\", "").replace('\\"', "")  # escaped backslashes, then escaped quotes
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", unescaped)).encode("ascii")  # the brackets outside strings
    deepest, level = 0, 0
    for start in range(0, len(brackets), BLOCK):
        steps = _STEP[np.frombuffer(brackets, np.uint8, count=min(BLOCK, len(brackets) - start), offset=start)]
        levels = level + np.cumsum(steps, dtype=np.int64)
        if len(levels):
            deepest, level = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` of a whole text, refused (``DepthError``) when nested deeper than ``max_depth``."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8")
    found = depth(text)
    if found > max_depth:
        raise DepthError(f"JSON nested {found} levels deep (at most {max_depth} are read)")
    return json.loads(text)


def values(text: str, max_depth: int = MAX_DEPTH) -> Iterator[Any]:
    """JSON objects and arrays found inside ``text`` (an answer that wraps its JSON in prose), in order, each
    followed by the objects and arrays nested in it (what a decode starting at their own bracket would give).

    A decode starts at each ``{`` or ``[`` that is not inside a value already found; one that fails counts the
    characters it scanned, and the search ends once those pass ``SEARCH_BUDGET`` times the text's length or
    ``MAX_FAILED`` decodes have failed. A value
    nested deeper than ``max_depth`` is skipped whole; a text nested deeper than that anywhere is refused whole
    (``DepthError``) before any decode."""
    found = depth(text)
    if found > max_depth:
        raise DepthError(f"JSON nested {found} levels deep (at most {max_depth} are read)")
    decoder = json.JSONDecoder()
    budget, spent, failed, resume = SEARCH_BUDGET * len(text) + 1024, 0, 0, 0
    for m in _OPEN.finditer(text):
        start = m.start()
        if start < resume:
            continue
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as e:
            spent += e.pos - start + 1
        except RecursionError:  # nested past the interpreter's limit before failing: it scanned about that far
            spent += sys.getrecursionlimit()
        else:
            resume = end
            if end - start <= 2 * max_depth or depth(text[start:end]) <= max_depth:  # shorter is shallow enough
                yield from _containers(value)
            continue
        failed += 1
        if spent > budget or failed > MAX_FAILED:
            return


def _containers(value: Any) -> Iterator[Any]:
    """``value`` and every object and array inside it, in document order (depth already bounded)."""
    todo = [value]
    while todo:
        item = todo.pop()
        yield item
        children = item.values() if isinstance(item, dict) else item
        todo.extend(reversed([c for c in children if isinstance(c, dict | list)]))
