"""Secret masking in linear time, for text that may come from a hostile message.

`redact(text)` masks the password of URLs (`redis://user:***@host`) and the
value after a secret-named key (`password=***`, `"token": "***"`,
`Authorization: Bearer ***`). It is a single left-to-right scan: one regex with
no alternation or nesting finds the words (`[A-Za-z0-9_-]+`, each character
read once), and each place that needs a closer look is read forward from the
current position, which only moves forward. Backtracking regexes over
untrusted text took 2.4 s for `"x" * 10_000`; this takes a few milliseconds per
megabyte, and `tests/workers/telemetry/test_redact.py` bounds the characters
each scan reads forward by a multiple of the text's length. A text is scanned
and kept up to `MAX_SCAN` characters (plus a look-ahead, so a secret across the
cut is masked whole); the rest is cut, and the line says how much.

Known secret values are masked too, wherever they appear and whatever surrounds
them: the process's settings register theirs (`remember_secrets`, called by
`workers.settings.get_settings`). Before the scan, each is looked for with
`str.find` (linear in the text for each; there are a handful) and every
occurrence, overlapping ones merged, becomes one mask.
"""

from __future__ import annotations

import heapq
import json
import re
import threading
import urllib.parse
from collections.abc import Iterable

__all__ = [
    "MASK",
    "SECRET_KEY",
    "forget_secrets",
    "known_secret_count",
    "redact",
    "remember_secrets",
]

MASK = "***"

#: Key names whose values are secrets (matched anywhere in the key, case-insensitive).
SECRET_KEY = re.compile(
    r"passw(?:or)?d|pwd|secret|token|authori[sz]ation|api[_-]?key|private[_-]?key|credential|cookie",
    re.IGNORECASE,
)
#: The words of a text; a run of these characters is one match, read once.
_WORD = re.compile(r"[A-Za-z0-9_-]+")
#: How much of a word's end is searched for a key name.
_KEY_MAX = 64
#: Words that introduce the credential after an Authorization-like key.
_SCHEMES = ("bearer", "basic", "token")
#: What the scan reads forward: each one character class, repeated (no alternation).
_SPACES = re.compile(r"\s*")
_USER = re.compile(r"[^:/@\s]*")
_PASSWORD = re.compile(r"[^@\s]*")
_BARE = re.compile(r"[^\s,;&\"'})\]]*")
#: Cheap first look: a text with none of these needs no scan.
_HINTS = ("://", "passw", "pwd", "secret", "token", "authori", "api", "private", "credential",
          "cookie")  # fmt: skip


#: Characters of one text that are scanned and kept; the rest is cut (and said so).
MAX_SCAN = 64 * 1024
#: Read this far past the cut, so a secret that straddles it is still masked whole.
LOOKAHEAD = 1024


# -- known secret values ---------------------------------------------------------------------

_lock = threading.Lock()
#: The values each source registered (the settings, Flower's basic auth, ...).
_sources: dict[str, frozenset[str]] = {}
#: Every registered string to mask, and the longest one's length (one value: read at once).
_known: tuple[tuple[str, ...], int] = ((), 0)


def _forms(value: str) -> set[str]:
    """`value` as it may be written: as is, URL-quoted, and escaped in JSON or a repr."""
    return {
        value,
        urllib.parse.quote(value, safe=""),
        json.dumps(value, ensure_ascii=False)[1:-1],
        json.dumps(value)[1:-1],
        repr(value)[1:-1],
    }


def remember_secrets(source: str, values: Iterable[str]) -> None:
    """Mask these exact values (and their quoted and escaped forms) in every redacted text,
    in place of what `source` registered before."""
    global _known
    forms = frozenset(form for value in values if value for form in _forms(value) if form)
    with _lock:
        if forms:
            _sources[source] = forms
        else:
            _sources.pop(source, None)
        known = tuple(sorted(set().union(*_sources.values()), key=len, reverse=True))
        _known = (known, len(known[0]) if known else 0)


def forget_secrets(source: str | None = None) -> None:
    """Stop masking the values `source` registered (every source's, if None)."""
    global _known
    if source is not None:
        remember_secrets(source, ())
        return
    with _lock:
        _sources.clear()
        _known = ((), 0)


def known_secret_count() -> int:
    """How many strings are masked as known secrets (their forms included)."""
    return len(_known[0])


def mask_known(text: str, limit: int, known: tuple[str, ...]) -> tuple[str, int]:
    """`text` with every occurrence of a known value that starts before `limit` masked, and
    where `limit` is in the result (after a mask that covers it)."""
    found = []
    for value in known:
        spans, size, stop = [], len(value), limit + len(value) - 1
        i = text.find(value, 0, stop)
        while i != -1:
            spans.append((i, i + size))
            i = text.find(value, i + size, stop)
        if spans:
            found.append(spans)
    if not found:
        return text, limit
    out: list[str] = []
    done, new_limit, shift = 0, -1, 0  # shift: how much shorter the result is so far
    start, end = -1, -1
    for s, e in [*heapq.merge(*found), (len(text) + 1, len(text) + 1)]:
        if s <= end:
            end = max(end, e)  # overlapping (or touching) occurrences: one mask
            continue
        if end > 0:
            out.append(text[done:start])
            out.append(MASK)
            if new_limit < 0 and end >= limit:
                new_limit = limit - shift if start >= limit else start - shift + len(MASK)
            shift += (end - start) - len(MASK)
            done = end
        start, end = s, e
    out.append(text[done:])
    return "".join(out), new_limit if new_limit >= 0 else limit - shift


def redact(text: str) -> str:
    """`text` with URL passwords, the values of secret-named keys and the known secret
    values (`remember_secrets`) masked.

    A text longer than `MAX_SCAN` characters keeps its first `MAX_SCAN`, followed
    by a note of how many were cut: a log line is no place for a megabyte.
    """
    known, longest = _known
    cut = len(text) - MAX_SCAN
    window = text[: MAX_SCAN + max(LOOKAHEAD, longest)] if cut > 0 else text
    limit = min(len(window), MAX_SCAN)
    if known:
        window, limit = mask_known(window, limit, known)
    lowered = window.lower()
    if any(hint in lowered for hint in _HINTS):
        kept = _Scan(window).run(limit=limit)
    else:
        kept = window[:limit]
    return kept + f"... [{cut} more characters not logged]" if cut > 0 else kept


class _Scan:
    """One left-to-right pass over `text`. Every forward read either settles text (so no
    later read covers it again) or fails at a point cached for the reads after it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        #: Characters read forward past a word (the work besides finding the words).
        self.reads = 0
        #: No '@' before this position (a failed URL password read ended here).
        self.no_at_before = -1
        #: Per quote character: (searched from, the first unescaped one at or after it, or -1).
        self.closes: dict[str, tuple[int, int]] = {}

    def run(self, limit: int | None = None) -> str:
        """The text up to `limit` with its secrets masked (a mask may reach past `limit`)."""
        text, out, done = self.text, [], 0  # text[:done] is settled
        limit = self.n if limit is None else limit
        for match in _WORD.finditer(text, 0, limit):
            start, end = match.span()
            if start < done:
                continue  # inside a value masked already
            span = self.url_password(end) or self.keyed_value(match.group(), end)
            if span is not None:
                out.append(text[done : span[0]])
                out.append(MASK)
                done = span[1]
        if done < limit:
            out.append(text[done:limit])
        return "".join(out)

    def forward(self, pattern: re.Pattern[str], pos: int) -> int:
        """Where `pattern` (a repeated character class: it always matches) ends from `pos`."""
        found = pattern.match(self.text, pos)
        end = found.end() if found is not None else pos
        self.reads += end - pos + 1
        return end

    def url_password(self, end: int) -> tuple[int, int] | None:
        """`scheme://user:PASSWORD@` right after the word ending at `end` (the scheme)."""
        text, n = self.text, self.n
        if not text.startswith("://", end):
            return None
        # The user name ends at the next ':', so user names never overlap.
        i = self.forward(_USER, end + 3)
        if i >= n or text[i] != ":" or i < self.no_at_before:
            return None
        j = self.forward(_PASSWORD, i + 1)
        if j >= n or text[j] != "@":
            self.no_at_before = j
            return None
        return (i + 1, j) if j > i + 1 else None

    def keyed_value(self, word: str, end: int) -> tuple[int, int] | None:
        """The value after a secret-named key (`key: value`, `"key" = "value"`), if any."""
        # A key name ends its word (`client_secret=`): a long word is searched at its end.
        if not SECRET_KEY.search(word[-_KEY_MAX:]):
            return None
        text, n, i = self.text, self.n, end
        if text.startswith('\\"', i):
            i += 1  # an escaped quote (JSON inside a string): read it as a quote
        if i < n and text[i] in "\"'":
            i += 1  # the key's closing quote
        i = self.forward(_SPACES, i)
        if i >= n or text[i] not in ":=":
            return None
        i = self.forward(_SPACES, i + 1)
        if i >= n:
            return None
        if text.startswith('\\"', i):
            close = text.find('\\"', i + 2)  # an escaped string ends at an escaped quote
            self.reads += (close if close != -1 else n) - i
            return (i + 2, close if close != -1 else n) if close != i + 2 else None
        if text[i] in "\"'":
            close = self.close_of(text[i], i + 1)
            if close == -1:
                return (i + 1, n) if i + 1 < n else None  # cut short: mask to the end
            return (i + 1, close) if close > i + 1 else None
        return self.bare(i)

    def close_of(self, quote: str, start: int) -> int:
        """The first `quote` at or after `start` not escaped by a backslash, or -1."""
        searched, found = self.closes.get(quote, (-1, -2))
        if searched <= start and (found == -1 or start <= found):
            return found
        text, i = self.text, start
        while True:
            close = text.find(quote, i)
            self.reads += (close if close != -1 else self.n) - i + 1
            if close == -1:
                break
            slashes, k = 0, close - 1
            while k >= 0 and text[k] == "\\":
                slashes += 1
                k -= 1
            self.reads += slashes
            if slashes % 2 == 0:
                break
            i = close + 1
        self.closes[quote] = (start, close)
        return close

    def bare(self, i: int) -> tuple[int, int] | None:
        """A value up to a delimiter, after an optional `Bearer `/`Basic `/`Token ` scheme."""
        text, n = self.text, self.n
        for scheme in _SCHEMES:
            after = i + len(scheme)
            if text[i:after].lower() == scheme and after < n and text[after].isspace():
                i = self.forward(_SPACES, after)
                break
        j = self.forward(_BARE, i)
        if j - i == len(MASK) and text.startswith(MASK, i):
            return None  # masked already
        return (i, j) if j > i else None
