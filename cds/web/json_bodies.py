"""Request bodies are JSON whose every string is storable text.

JSON can spell characters no part of psych-cds can keep: ``\\u0000`` (PostgreSQL text refuses NUL, the
audit chain refuses it on purpose) and lone surrogates such as ``\\ud800`` (not Unicode, so not
encodable as UTF-8). Python's parser accepts both, and each store that later met them failed with a
500. Refusing them where JSON is parsed answers every endpoint with one 400 OperationOutcome saying
why, instead of a check in each handler.
"""

from __future__ import annotations

from typing import Any

from flask.json.provider import DefaultJSONProvider

from cds.errors import InputError


class UnstorableText(InputError):
    """A string in the body holds NUL or a lone surrogate."""


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise UnstorableText("JSON strings must not contain NUL characters (U+0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnstorableText("JSON strings must be valid Unicode (no lone surrogates)") from exc


def check_storable(document: Any) -> None:
    """Raise UnstorableText for the first key or string value that cannot be stored; iterative, so
    a document deep enough to have parsed is never too deep to check."""
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                _check_text(key)
                pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)


class StorableJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing unstorable strings while parsing. Not a ValueError, so even
    ``request.get_json(silent=True)`` raises it and the error handler answers 400 with the reason."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        document = super().loads(s, **kwargs)
        check_storable(document)
        return document
