"""Credentials inside URLs (``https://user:pass@host``, ``redis://:pw@host:6379``) masked or
removed wherever a URL is shown: ``check-config``, log lines, message headers and values."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

# scheme://userinfo@ -- userinfo has no '/', '@' or whitespace (RFC 3986 section 3.2.1)
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def mask_userinfo(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _USERINFO_RE.sub(r"\g<scheme>***@", text) if "@" in text else text


def url_passwords(text: str) -> list[str]:
    """The passwords inside the URLs of ``text``, as written and decoded (to scrub)."""
    found: list[str] = []
    for match in _USERINFO_RE.finditer(text):
        user, colon, password = match.group(0)[len(match.group("scheme")):-1].partition(":")
        # user:password -> the password; a lone name is often a token (https://TOKEN@host)
        secret = password if colon else user
        if secret:
            found.extend({secret, unquote(secret)})
    return found


def host_port(url: str) -> str:
    """``host[:port]`` of ``url``, without any credentials."""
    return urlsplit(url).netloc.rpartition("@")[2]
