"""A patient's history from the EHR, for the rules: diagnoses, a recorded prior suicide attempt, age.

# /Condition?subject=Patient/123&_count=200   and   /Patient/123
A prior attempt is a Condition coded as a suicide attempt or a personal history of self-harm.
When the EHR cannot be asked, the answer is "unknown" (None), never "no".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import Any

from cds.errors import CdsError
from integrations.fhir.client import FhirClient

ICD10 = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10-cn")
SNOMED = "http://snomed.info/sct"
# ICD-10: T14.91 suicide attempt; Z91.5 personal history of self-harm; X60-X84 intentional self-harm.
# SNOMED CT: 82313006 suicide attempt; 161469008 history of deliberate self harm.
_ATTEMPT_ICD_PREFIXES = ("T14.91", "Z91.5") + tuple(f"X{n}" for n in range(60, 85))
_ATTEMPT_SNOMED = {"82313006", "161469008"}


@dataclass(frozen=True)
class PatientHistory:
    conditions: tuple[str, ...]
    prior_attempt: bool | None
    birth_date: date | None


def _codes(condition: dict[str, Any]) -> Iterable[tuple[str, str]]:
    for coding in (condition.get("code") or {}).get("coding", []) or []:
        if coding.get("code"):
            yield str(coding.get("system", "")), str(coding["code"])


def is_attempt(system: str, code: str) -> bool:
    if system in ICD10:
        return code.upper().startswith(_ATTEMPT_ICD_PREFIXES)
    return system == SNOMED and code in _ATTEMPT_SNOMED


def fetch_history(client: FhirClient, patient_ref: str) -> PatientHistory | None:
    """Ask the EHR; None when it cannot answer (the rules then treat history as unknown)."""
    try:
        conditions = list(client.search_all("Condition", {"subject": patient_ref, "_count": 200}, max_pages=5))
        patient = client.read(*patient_ref.split("/", 1))
    except CdsError:
        return None
    codes: list[str] = []
    attempt = False
    for cond in conditions:
        status = ((cond.get("verificationStatus") or {}).get("coding") or [{}])[0].get("code")
        if status in ("refuted", "entered-in-error"):
            continue
        for system, code in _codes(cond):
            codes.append(code)
            attempt = attempt or is_attempt(system, code)
    born = None
    if isinstance(patient.get("birthDate"), str) and len(patient["birthDate"]) == 10:
        try:
            born = date.fromisoformat(patient["birthDate"])
        except ValueError:
            born = None
    return PatientHistory(tuple(dict.fromkeys(codes)), attempt, born)
