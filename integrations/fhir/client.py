"""A small FHIR R4 REST client: JSON in, JSON out, errors mapped to exceptions in one place.

Authentication is pluggable (``TokenSource``): SMART Backend Services for a hospital EHR, none for
the local sandbox. camelCase FHIR JSON stays inside integrations/fhir.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import urlencode

import requests

from cds.errors import AuthError, ConflictError, EhrError, EhrRejected, EhrUnavailable, NotFoundError

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"


class TruncatedSearch(EhrError):
    """A search had more pages than the caller would follow: its answer is incomplete."""


class TokenSource(Protocol):
    def token(self, *, force_refresh: bool = False) -> str: ...


def raise_for_outcome(response: requests.Response) -> None:
    """Map an HTTP error status to the one exception that says what to do about it."""
    status = response.status_code
    if status < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    outcome = body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None
    diagnostics = ""
    if outcome:
        diagnostics = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code"))
                                for i in outcome.get("issue", []))
    message = f"EHR answered {status} for {response.request.method} {response.url.split('?')[0]}"
    if diagnostics:
        message += f": {diagnostics}"
    if status == 401:
        raise AuthError(message)
    if status in (404, 410):
        raise NotFoundError(message)
    if status in (409, 412):
        raise ConflictError(message)
    if status == 429 or status >= 500:
        raise EhrUnavailable(message, status=status, outcome=outcome)
    raise EhrRejected(message, status=status, outcome=outcome)


class FhirClient:
    def __init__(self, base_url: str, *, auth: TokenSource | None = None, timeout_s: float = 15.0,
                 session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def _headers(self, extra: Mapping[str, str] | None, *, force_refresh: bool = False) -> dict[str, str]:
        headers = {"Accept": FHIR_JSON}
        if self.auth is not None:
            headers["Authorization"] = "Bearer " + self.auth.token(force_refresh=force_refresh)
        if extra:
            headers.update(extra)
        return headers

    def request(self, method: str, path_or_url: str, *, json_body: Any = None,
                params: Mapping[str, Any] | None = None,
                headers: Mapping[str, str] | None = None) -> requests.Response:
        url = path_or_url if path_or_url.startswith("http") else f"{self.base_url}/{path_or_url.lstrip('/')}"
        hdrs = self._headers(headers)
        if json_body is not None:
            hdrs["Content-Type"] = FHIR_JSON
        for attempt in (0, 1):
            try:
                response = self.session.request(method, url, json=json_body, params=params, headers=hdrs,
                                                timeout=self.timeout_s)
            except requests.RequestException as exc:
                raise EhrUnavailable(f"EHR unreachable: {exc.__class__.__name__} for {method} "
                                     f"{url.split('?')[0]}") from exc
            if response.status_code == 401 and self.auth is not None and attempt == 0:
                hdrs = {**hdrs, **self._headers(None, force_refresh=True)}  # token expired: refresh once
                continue
            raise_for_outcome(response)
            return response
        raise AssertionError("unreachable")

    # -- the operations the service uses ------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"{resource_type}/{resource_id}").json())

    def create(self, resource: Mapping[str, Any], *, if_none_exist: str | None = None) -> dict[str, Any]:
        headers = {"If-None-Exist": if_none_exist} if if_none_exist else None
        return dict(self.request("POST", str(resource["resourceType"]), json_body=resource,
                                 headers=headers).json())

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        result = self.request("POST", "", json_body=bundle).json()
        if not isinstance(result, dict) or result.get("resourceType") != "Bundle":
            raise EhrError("EHR answered a transaction with something other than a Bundle")
        return result

    def search(self, resource_type: str, params: Mapping[str, Any]) -> dict[str, Any]:
        # /QuestionnaireResponse?_lastUpdated=gt2026-11-01T00:00:00Z&_sort=_lastUpdated&_count=100
        return dict(self.request("GET", f"{resource_type}?{urlencode(params)}").json())

    def search_all(self, resource_type: str, params: Mapping[str, Any],
                   max_pages: int = 1000, *, strict: bool = False) -> Iterator[dict[str, Any]]:
        """Every matching resource, following ``next`` links where the server gives them. After
        ``max_pages`` it stops, and with ``strict`` raises TruncatedSearch instead of ending quietly."""
        bundle = self.search(resource_type, params)
        for page in range(max_pages):
            for entry in bundle.get("entry", []):
                if "resource" in entry:
                    yield entry["resource"]
            next_url = next((link["url"] for link in bundle.get("link", []) if link.get("relation") == "next"),
                            None)
            if not next_url:
                return
            if strict and page == max_pages - 1:
                raise TruncatedSearch(f"{resource_type} search has more than {max_pages} pages")
            bundle = self.request("GET", next_url).json()
