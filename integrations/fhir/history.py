"""A patient's history from the EHR, for the rules: diagnoses, a recorded prior suicide attempt, age.

# /Condition?subject=Patient/1,Patient/2&_count=1000   and   /Patient?_id=1,2
A prior attempt is a Condition coded as a suicide attempt or a personal history of self-harm.
When the EHR cannot be asked, the answer is "unknown" (None), never "no".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


# How many patients one search names (the URL stays a few kilobytes) and the pages it may follow.
BATCH = 50
_MAX_PAGES = 50


def fetch_histories(client: FhirClient, patient_refs: Sequence[str]) -> dict[str, PatientHistory | None]:
    """Ask the EHR about several patients at once: one Condition search and one Patient search per
    ``BATCH`` patients (``subject=Patient/1,Patient/2``: a comma is FHIR's "or"), not two requests each.

    Every ref asked gets an answer: its history, or None when the EHR could not answer (unreachable,
    a refusal, more pages than ``_MAX_PAGES``, or no such patient), which the rules treat as unknown."""
    refs = list(dict.fromkeys(patient_refs))
    out: dict[str, PatientHistory | None] = {}
    for i in range(0, len(refs), BATCH):
        out.update(_fetch_chunk(client, refs[i:i + BATCH]))
    return out


def _fetch_chunk(client: FhirClient, refs: list[str]) -> dict[str, PatientHistory | None]:
    answers: dict[str, PatientHistory | None] = dict.fromkeys(refs)  # None (unknown) until the EHR answers
    ids = {ref: ref.split("/", 1)[1] for ref in refs if ref.startswith("Patient/") and "," not in ref}
    if not ids:
        return answers
    try:
        conditions = list(client.search_all("Condition", {"subject": ",".join(ids), "_count": 1000},
                                            max_pages=_MAX_PAGES, strict=True))
        patients = list(client.search_all("Patient", {"_id": ",".join(ids.values()), "_count": len(ids)},
                                          max_pages=2, strict=True))
    except CdsError:  # TruncatedSearch included
        return answers
    codes: dict[str, list[str]] = {ref: [] for ref in ids}
    attempt = dict.fromkeys(ids, False)
    for cond in conditions:
        ref = ((cond.get("subject") or {}).get("reference") or "").split("/_history")[0]
        if ref not in codes:
            continue
        status = ((cond.get("verificationStatus") or {}).get("coding") or [{}])[0].get("code")
        if status in ("refuted", "entered-in-error"):
            continue
        for system, code in _codes(cond):
            codes[ref].append(code)
            attempt[ref] = attempt[ref] or is_attempt(system, code)
    for pat in patients:
        ref = f"Patient/{pat.get('id')}"
        if ref in ids:
            answers[ref] = PatientHistory(tuple(dict.fromkeys(codes[ref])), attempt[ref], _birth_date(pat))
    return answers


def _birth_date(patient: dict[str, Any]) -> date | None:
    if isinstance(patient.get("birthDate"), str) and len(patient["birthDate"]) == 10:
        try:
            return date.fromisoformat(patient["birthDate"])
        except ValueError:
            return None
    return None
