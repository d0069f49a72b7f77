"""Secrets: values that never show, read from the environment or from mounted files.

`Secret` holds a credential. Its characters are `'********'`, so whatever turns
it into text (str, repr, format, %, JSON, a log line, a task message) shows the
mask; `.reveal()` is the one way to the value, used where the credential is
handed to what needs it. Used as a credential without `.reveal()`, it sends the
mask, and the login fails (loudly) instead of the value leaking.

`read_secret_file(path)` reads a secret mounted as a file (Docker, Kubernetes):
its content without the trailing newline; a file that its group or others may
read is refused, as private keys are (`workers.security.keys`).

The URL helpers put a password into a Redis URL that has none, and tell a URL
that would carry credentials in plain text off this host.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
import urllib.parse
from typing import Any, NoReturn

__all__ = [
    "MASKED",
    "Secret",
    "SecretFileError",
    "cert_reqs",
    "hide_password",
    "plaintext_remote",
    "read_secret_file",
    "url_password",
    "with_password",
]

#: What a `Secret` shows of itself.
MASKED = "********"

#: A secret file holds one value: anything bigger is not one (and is not read whole).
MAX_SECRET_FILE = 64 * 1024


class Secret(str):
    """A credential whose text is `'********'`; `.reveal()` gives the value.

    Two secrets are equal if their values are (compared in constant time); a
    secret is never equal to a plain string. It is not pickled (a pickle would
    carry the value); copies are the secret itself.
    """

    _value: str

    def __new__(cls, value: str) -> Secret:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, not {type(value).__name__}")
        if isinstance(value, Secret):
            value = value.reveal()
        obj = super().__new__(cls, MASKED)
        object.__setattr__(obj, "_value", value)
        return obj

    def reveal(self) -> str:
        """The value: hand it to what needs the credential, never to a log line."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASKED!r})"

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("a Secret is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return False
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(MASKED)

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("a Secret is not pickled: its value would be in the pickle")


class SecretFileError(ValueError):
    """A secret file is missing, unreadable or unsafe; the message names it, never its content."""


def read_secret_file(path: str | os.PathLike[str]) -> str:
    """The content of secret file `path` (UTF-8, one trailing newline removed).

    Refused (`SecretFileError`) if it cannot be read, is not a regular file, is
    larger than `MAX_SECRET_FILE`, or its group or others have any access to it.
    """
    shown = os.fspath(path)
    try:
        fd = os.open(
            shown, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        )
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {shown} ({exc.strerror})") from None
    try:
        st = os.fstat(fd)  # the file opened, not whatever the name points to by now
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"secret file {shown} is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                f"secret file {shown} is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {shown}"
            )
        if st.st_size > MAX_SECRET_FILE:
            raise SecretFileError(
                f"secret file {shown} holds {st.st_size} bytes; a secret file holds one value "
                f"(at most {MAX_SECRET_FILE} bytes)"
            )
        try:
            data = os.read(fd, MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise SecretFileError(f"cannot read secret file {shown} ({exc.strerror})") from None
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"secret file {shown} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1].removesuffix("\r")
    return text


# -- Redis URLs --------------------------------------------------------------------------------


def _split_netloc(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, userinfo, hostport, rest) of `scheme://[userinfo@]hostport/rest`, or None."""
    scheme, sep, after = url.partition("://")
    if not sep:
        return None
    end = len(after)
    for stop in "/?#":
        found = after.find(stop)
        if found != -1:
            end = min(end, found)
    netloc, rest = after[:end], after[end:]
    userinfo, at, hostport = netloc.rpartition("@")
    return scheme, userinfo if at else "", hostport, rest


def _parts(url: str) -> list[str]:
    """The nodes of a `;`-separated URL (sentinel://, redis+cluster://), or the URL itself."""
    return url.split(";")


def url_password(url: str) -> str | None:
    """The password a URL carries (unquoted; the first node's in a `;`-separated one)."""
    parts = _split_netloc(_parts(url)[0])
    if parts is None or ":" not in parts[1]:
        return None
    password = urllib.parse.unquote(parts[1].split(":", 1)[1])
    return password or None


def with_password(url: str, password: str) -> str:
    """`url` with `password` (quoted) in each node, keeping its user; unchanged if it has one."""
    if url_password(url) is not None:
        return url
    quoted = urllib.parse.quote(password, safe="")
    nodes = []
    for node in _parts(url):
        parts = _split_netloc(node)
        if parts is None:
            nodes.append(node)
            continue
        scheme, userinfo, hostport, rest = parts
        nodes.append(f"{scheme}://{userinfo.split(':', 1)[0]}:{quoted}@{hostport}{rest}")
    return ";".join(nodes)


def hide_password(url: str) -> str:
    """`url` with its passwords, if any, shown as `***`."""
    nodes = []
    for node in _parts(url):
        parts = _split_netloc(node)
        if parts is None or ":" not in parts[1]:
            nodes.append(node)
            continue
        scheme, userinfo, hostport, rest = parts
        nodes.append(f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostport}{rest}")
    return ";".join(nodes)


def _loopback(host: str) -> bool:
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: Schemes whose traffic crosses the network in clear.
_PLAIN = ("redis://", "sentinel://", "redis+cluster://", "amqp://", "pyamqp://")


def plaintext_remote(url: str) -> bool:
    """True if a node of `url` is reached in clear (`redis://`, `sentinel://`, `amqp://`, ...)
    on a host other than this one's loopback (credentials and task messages would cross a
    network in clear)."""
    for node in _parts(url):
        if not node.startswith(_PLAIN):
            continue  # rediss:// and amqps:// (TLS) or unix:// (a local socket)
        try:
            host = urllib.parse.urlsplit(node).hostname
        except ValueError:
            return True
        if not (host and _loopback(host)):
            return True
    return False


def cert_reqs(url: str) -> str | None:
    """The `ssl_cert_reqs` a `rediss://` URL names (lower case), or None."""
    try:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    except ValueError:
        return None
    values = query.get("ssl_cert_reqs")
    return values[-1].strip().lower() if values else None
