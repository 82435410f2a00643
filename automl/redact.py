"""Secrets out of what we write and print: a URL's password (a database or tracking server) is masked.

Tracking URIs and storage URLs may carry a password (``postgresql://user:pw@host/db``,
``http://user:pw@host``). They reach helper processes through the environment, never a command line (``ps``
shows arguments to every user), and every file or line automl writes holds the masked form.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def mask_url(url: str | None) -> str | None:
    """``url`` with the password of its user-info part replaced by ``***`` (unchanged when it has none)."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can parse: hide everything before the host, to be safe
        return MASK + url[url.rindex("@"):]
    if not password:
        return url
    user_info, _, host = parts.netloc.rpartition("@")
    user = user_info.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def is_masked(url: str | None) -> bool:
    """True when ``url`` came from ``mask_url`` with a password taken out (it cannot be used to connect)."""
    return bool(url) and f":{MASK}@" in str(url)


def without_credentials(url: str) -> str:
    """``url`` with no user name or password at all: for links shown to others (a browser asks for its own)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
