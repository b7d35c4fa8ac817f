"""Secrets stay out of what tuneloop prints and writes: passwords in URLs and tokens in commands.

`mask_url` never gives back a password, whether or not SQLAlchemy (or anyone) can parse the URL: the
credentials end at the *last* `@` before the host (a password may contain an unescaped `@`, a host never
does), and everything between the user name and that `@` is replaced. Query parameters that carry
secrets (`password=`, `token=`...) are masked too. Masking more than needed is fine; less is not.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)?(?P<rest>.*)$", re.S)
_SECRET_PARAM = re.compile(r"(?P<key>(?:password|passwd|pwd|token|secret|api_key|apikey|access_key)=)[^&#\s]*", re.I)
# Options that take a value which may hold a secret (a storage URL, a token), wherever they appear in a command.
SECRET_OPTIONS = ("--storage", "--token", "--hub-token", "--tracking-uri")


def _credentials(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, user, password, after) of `scheme://user:password@after`, or None without a password."""
    m = _SCHEME.match(url)
    scheme, rest = m.group("scheme") or "", m.group("rest")
    at = rest.rfind("@")
    if at < 0:
        return None
    userinfo = rest[:at]
    if ":" not in userinfo:
        return None
    user, password = userinfo.split(":", 1)
    return scheme, user, password, rest[at + 1:]


def mask_url(url: str) -> str:
    """`url` with its password (and secret query values) replaced by ***; unparseable URLs included."""
    url = str(url)
    found = _credentials(url)
    if found is not None:
        scheme, user, _, after = found
        url = f"{scheme}{user}:{MASK}@{after}"
    return _SECRET_PARAM.sub(lambda m: m.group("key") + MASK, url)


def secrets_of(url: str) -> list[str]:
    """The secret strings inside `url` (its password, raw and percent-decoded, and secret query values)."""
    url = str(url)
    found = _credentials(url)
    values = [found[2]] if found is not None and found[2] else []
    values += [m.group(0).split("=", 1)[1] for m in _SECRET_PARAM.finditer(url)]
    values += [unquote(v) for v in values]
    return sorted({v for v in values if v}, key=len, reverse=True)


def redact(text: str, *urls: str) -> str:
    """`text` (an error message, a log line) with every secret of `urls` masked, wherever it appears."""
    text = str(text)
    for url in urls:
        if url:
            text = text.replace(str(url), mask_url(url))
            for secret in secrets_of(url):
                text = text.replace(secret, MASK)
    return text


def mask_command(argv: list[str]) -> list[str]:
    """A command line with the values of secret-bearing options and any URL's password masked."""
    masked, hide_next = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if hide_next:
            masked.append(mask_url(arg) if "://" in arg else MASK)
        elif eq and name in SECRET_OPTIONS:
            masked.append(f"{name}={mask_url(value) if '://' in value else MASK}")
        else:
            masked.append(mask_url(arg))
        hide_next = arg in SECRET_OPTIONS
    return masked


def hide(text: str, *secrets: str | None) -> str:
    """`text` with each given secret (a token, a password) replaced by ***."""
    text = str(text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text
