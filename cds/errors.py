"""One exception hierarchy for psych-cds.

Each edge translates once: the FHIR client maps HTTP status to these, the Flask error handler maps
these to an OperationOutcome with an HTTP status, the CLI maps them to a message and exit code.
"""

from __future__ import annotations

from typing import Any


class CdsError(Exception):
    """Base of every error psych-cds raises on purpose."""

    http_status = 500
    issue_code = "exception"  # FHIR IssueType code used in OperationOutcome


class ConfigError(CdsError):
    """A setting is missing or wrong; the service refuses to start."""


class InputError(CdsError):
    """Input that cannot be parsed or validated (bad FHIR, bad JSON, unknown instrument...)."""

    http_status = 400
    issue_code = "invalid"


class NotFoundError(CdsError):
    http_status = 404
    issue_code = "not-found"


class ConflictError(CdsError):
    http_status = 409
    issue_code = "conflict"


class AuthError(CdsError):
    """Authentication failed (401)."""

    http_status = 401
    issue_code = "login"


class ForbiddenError(CdsError):
    """Authenticated but not allowed (403)."""

    http_status = 403
    issue_code = "forbidden"


class RateLimitError(CdsError):
    http_status = 429
    issue_code = "throttled"


class RulesError(CdsError):
    """A rule or instrument definition is invalid (schema, logic, cases)."""


class ModelError(CdsError):
    """The text model artefact is missing, corrupt, or does not match its manifest."""


class StoreError(CdsError):
    """The database is unreachable or a migration failed."""

    http_status = 503
    issue_code = "transient"


class NotAssessed(CdsError):
    """The input is stored but its assessment failed; the workers retry it. Never an answer of "no risk"."""

    http_status = 503
    issue_code = "transient"
    retry_after_s = 30


class EhrError(CdsError):
    """The EHR answered with an error or could not be reached."""

    http_status = 502
    issue_code = "transient"

    def __init__(self, message: str, status: int | None = None,
                 outcome: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


class EhrUnavailable(EhrError):
    """Network error or 5xx/429: retry later."""


class EhrRejected(EhrError):
    """4xx other than 401/404/409/412/429: retrying the same request will not help."""


class CryptoError(CdsError):
    """Decryption failed: wrong key, tampered ciphertext, or the data key was erased."""


class ErasedError(CryptoError):
    """The patient's data key was crypto-shredded; the text can never be read again."""
