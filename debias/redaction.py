"""One redaction for everything the sweep prints, logs or writes: no credential leaves it.

A tracking URI may carry a password (``http://user:password@host``, ``postgresql://...``);
MLflow's own exception texts quote the URI; environment variables hold tokens. Every place
that shows text to a person or writes it under ``storage`` goes through :func:`redact`:

- the user-info of any ``scheme://user:password@`` in the text becomes ``***`` (the form
  :func:`redact_uri` gives, and the form the sweep's printed commands carry);
- every secret this process knows (passwords of the URIs it was given, registered with
  :func:`remember_uri`, and ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN``), as
  given and URL-decoded, is replaced wherever it appears, even outside a URI.

:func:`install` puts the redaction on ``sys.stdout`` / ``sys.stderr`` (so ``print``, logging
handlers, Tune's reporter and the lines Ray forwards from its workers all pass through it)
and on the root logger's handlers. A URI printed masked (``http://***@host``) and given back
(a printed ``--resume`` command run as printed) is completed from the environment by
:func:`unmask_uri`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from typing import Any, TextIO
from urllib.parse import quote, unquote, urlsplit

__all__ = ["MASK", "install", "is_masked", "redact", "redact_uri", "remember_uri",
           "unmask_uri"]

MASK = "***"
#: ``scheme://userinfo@``: the user-info of a URI (no '/', '@' or white space inside).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<info>[^/@\s'\"]+)@")
#: Secrets shorter than this are not replaced outside URIs: they would garble the text.
_MIN_SECRET = 4
_ENV_SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

_secrets: set[str] = set()
_lock = threading.Lock()


def redact_uri(uri: str) -> str:
    """``uri`` with its user-info (``user:password@``) shown as ``***@``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(uri))


def remember_uri(uri: str) -> None:
    """Learn the password of ``uri`` (if any), so :func:`redact` hides it everywhere, also
    where a library quotes it without the URI around it."""
    try:
        password = urlsplit(uri).password
    except ValueError:
        password = None
    if password and password != MASK:
        with _lock:
            _secrets.update({password, unquote(password), quote(unquote(password), safe="")})


def _known_secrets() -> list[str]:
    with _lock:
        found = set(_secrets)
    for name in _ENV_SECRETS:
        value = os.environ.get(name)
        if value:
            found.add(value)
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)


def redact(text: Any) -> str:
    """``text`` with every credential this process knows of masked."""
    out = redact_uri(str(text))
    for secret in _known_secrets():
        if secret in out:
            out = out.replace(secret, MASK)
    return out


def is_masked(uri: str) -> bool:
    """Whether ``uri`` carries masked credentials (``scheme://***@`` or ``user:***@``), as
    the sweep prints them."""
    match = _USERINFO.match(uri.strip())
    if not match:
        return False
    info = match["info"]
    return info == MASK or info.endswith(":" + MASK)


class MaskedCredentials(ValueError):
    """A masked URI and no credentials in the environment to complete it."""


def unmask_uri(uri: str) -> tuple[str, str | None]:
    """A URI printed masked (``http://***@host``, ``http://user:***@host``), completed from
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: returns (the URI to use,
    a note saying where the credentials came from), or (``uri``, None) when it is not
    masked. Raises :class:`MaskedCredentials` naming what is missing."""
    if not is_masked(uri):
        return uri, None
    match = _USERINFO.match(uri.strip())
    assert match is not None
    info = match["info"]
    user = None if info == MASK else unquote(info.rsplit(":", 1)[0])
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or user
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    missing = [name for name, value in (("MLFLOW_TRACKING_USERNAME", user),
                                        ("MLFLOW_TRACKING_PASSWORD", password)) if not value]
    if missing:
        raise MaskedCredentials(
            f"tracking.uri: {uri} has its credentials masked ({MASK}), as the sweep prints "
            f"them, and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
            "set; set them in the environment (or give the URI with the real user and "
            "password) and run the command again")
    assert user is not None and password is not None
    rest = uri.strip()[match.end():]
    full = f"{match['scheme']}{quote(user, safe='')}:{quote(password, safe='')}@{rest}"
    remember_uri(full)
    return full, ("tracking.uri: the credentials masked in the URI were taken from "
                  "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")


# --------------------------------------------------------------------------- streams, logs


class _RedactingStream(io.TextIOBase):
    """A text stream that redacts every write before passing it on."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        # A closed terminal (SIGHUP) or pipe must not turn a message into a traceback.
        with contextlib.suppress(OSError, ValueError):
            self._inner.write(redact(text))
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._inner.flush()

    def isatty(self) -> bool:
        try:
            return self._inner.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self._inner.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, buffer, errors, ...
        return getattr(self._inner, name)


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = _RedactingFilter()


def install(*uris: str) -> None:
    """Redact this process's standard streams and its root logger's handlers from now on;
    remember the passwords of ``uris``. Idempotent."""
    for uri in uris:
        remember_uri(uri)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))
    loggers = [logging.getLogger()] + [
        lg for lg in list(logging.Logger.manager.loggerDict.values())
        if isinstance(lg, logging.Logger)]
    for logger in loggers:  # Ray's and Tune's loggers have handlers of their own
        for handler in list(logger.handlers):
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
