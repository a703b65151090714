"""A stored risk -> one CDS Hooks 2.0 card. Pure: no I/O, no risk computed, no patient text.

Indicator: critical for high/imminent, warning for moderate or an indeterminate result (missing data
is never shown as reassurance), info for low/none. The detail lists the rules that fired with their
clinical sources and the rule-set / model versions; evidence appears by kind only ("plan, timing").
For moderate and above, one suggestion: a draft psychiatry-referral ServiceRequest whose
reasonReference is the RiskAssessment psych-cds wrote back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from cds.domain import FLAG_INDETERMINATE, RiskTier
from integrations.cdshooks.store import StoredRisk
from integrations.fhir.mapping import CDS_SYSTEM, TIER_NAMES

SUMMARY_MAX = 139  # the spec: summary SHOULD be under 140 characters
TOPIC = {"system": f"{CDS_SYSTEM}/fhir/CodeSystem/cds-topic", "code": "suicide-self-harm-risk",
         "display": "Suicide, self-harm and harm-to-others risk"}
OVERRIDE_SYSTEM = f"{CDS_SYSTEM}/fhir/CodeSystem/cds-override-reason"
OVERRIDE_REASONS = (
    ("assessed-in-person", "Risk assessed in person; not confirmed"),
    ("already-under-care", "Already under psychiatric care for this"),
    ("referral-exists", "Referral or safety plan already in place"),
    ("patient-declined", "Patient declined"),
    ("not-clinically-relevant", "Not clinically relevant (false positive)"),
)
# Psychiatry referral (SNOMED CT 183524004 |Referral to psychiatry service|).
REFERRAL_CODE = {"system": "http://snomed.info/sct", "code": "183524004",
                 "display": "Referral to psychiatry service"}
REFERRAL_PRIORITY = {RiskTier.MODERATE: "urgent", RiskTier.HIGH: "asap", RiskTier.IMMINENT: "stat"}
FLAG_WORDS = {"harm_to_others": "harm to others", "victimisation": "victimisation", "discordant": "discordant",
              FLAG_INDETERMINATE: "indeterminate (missing data)"}


def indicator_for(risk: StoredRisk) -> str:
    if risk.tier >= RiskTier.HIGH:
        return "critical"
    if risk.tier == RiskTier.MODERATE or FLAG_INDETERMINATE in risk.flags:
        return "warning"
    return "info"


def _when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M UTC") if ts else "unknown"


def summary_for(risk: StoredRisk) -> str:
    en, zh = TIER_NAMES[risk.tier]
    text = f"Suicide risk {en.upper()} / 自杀风险{zh} (psych-cds)"
    if risk.fired and risk.tier > RiskTier.NONE:
        text += f": {risk.fired[0].title}"
    elif FLAG_INDETERMINATE in risk.flags:
        text += ": screening incomplete, not negative"
    if risk.open_alerts:
        text += f"; open {risk.open_alerts[0].priority} alert"
    return text if len(text) <= SUMMARY_MAX else text[:SUMMARY_MAX - 1].rstrip() + "…"


def _scores_line(scores: Mapping[str, Any]) -> str:
    parts = []
    for instrument, values in sorted(scores.items()):
        if not isinstance(values, Mapping):
            continue
        numbers = [f"{k} {v}" for k, v in values.items()
                   if isinstance(v, (int, float, str)) and not isinstance(v, bool) and len(str(v)) < 24]
        parts.append(f"{instrument.upper()}: " + ", ".join(numbers))
    return "; ".join(parts)


def _md(text: str) -> str:
    """Rule titles and traces are ours, but keep Markdown structure characters from breaking lists."""
    return text.replace("\n", " ").replace("|", "\\|")


def detail_for(risk: StoredRisk) -> str:
    en, zh = TIER_NAMES[risk.tier]
    lines = [(f"**Current tier: {en} / {zh}** since {_when(risk.tier_since)}; "
             f"last assessed {_when(risk.assessed_at)}.")]
    flags = [FLAG_WORDS.get(f, f) for f in risk.flags]
    if flags:
        lines.append(f"**Flags:** {', '.join(flags)}")
    if risk.missing:
        lines.append(f"**Missing:** {', '.join(_md(m) for m in risk.missing)}")
    if risk.fired:
        lines += ["", "**Rules that fired**", ""]
        for rule in risk.fired:
            lines.append(f"- **{_md(rule.title)}** (`{rule.id}` v{rule.version})")
            lines += [f"    - {_md(t)}" for t in rule.trace[:4]]
            if rule.source:
                lines.append(f"    - *Source:* {_md(' '.join(rule.source.split()))}")
    else:
        lines += ["", "No triage rule fired."]
    if risk.evidence_kinds:
        lines += ["", (f"**Evidence (kinds only):** {', '.join(k.replace('_', ' ') for k in risk.evidence_kinds)}"
                      " - the highlighted text is in the psych-cds dashboard.")]
    scores = _scores_line(risk.scores)
    if scores:
        lines += ["", f"**Scores:** {_md(scores)}"]
    if risk.open_alerts:
        lines += ["", "**Open alerts:** " + "; ".join(
            f"{a.kind}, priority {a.priority}, {a.status}, due {_when(a.due_at)}" for a in risk.open_alerts)]
    model = f"text model `{risk.model_sha256[:12]}`" if risk.model_sha256 else "no text model"
    lines += ["", "---",
              (f"Rule set {risk.ruleset_version or '?'} (`{risk.ruleset_hash[:12]}`), {model}. "
              "psych-cds supports clinical judgement; it does not replace it.")]
    return "\n".join(lines)


def referral_suggestion(risk: StoredRisk, suggestion_uuid: uuid.UUID) -> dict[str, Any]:
    en, _ = TIER_NAMES[risk.tier]
    priority = REFERRAL_PRIORITY.get(risk.tier, "routine")
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest", "status": "draft", "intent": "order", "priority": priority,
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "306206005",
                                  "display": "Referral to service"}]}],
        "code": {"coding": [REFERRAL_CODE], "text": "Psychiatry referral (suicide risk)"},
        "subject": {"reference": risk.patient_ref},
        "reasonCode": [{"text": f"Suicide risk {en} (psych-cds)"}],
    }
    if risk.fhir_id:
        request["reasonReference"] = [{"reference": f"RiskAssessment/{risk.fhir_id}"}]
    return {"label": f"Refer to psychiatry ({priority})", "uuid": str(suggestion_uuid), "isRecommended": True,
            "actions": [{"type": "create", "description": f"Create a {priority} psychiatry referral",
                         "resource": request}]}


def risk_card(risk: StoredRisk, *, card_uuid: uuid.UUID, suggestion_uuid: uuid.UUID,
              public_base_url: str) -> dict[str, Any]:
    """The one card for a patient's stored risk."""
    card: dict[str, Any] = {
        "uuid": str(card_uuid),
        "summary": summary_for(risk),
        "detail": detail_for(risk),
        "indicator": indicator_for(risk),
        "source": {"label": "psych-cds risk supervision", "url": f"{public_base_url}/", "topic": TOPIC},
        "overrideReasons": [{"system": OVERRIDE_SYSTEM, "code": c, "display": d} for c, d in OVERRIDE_REASONS],
        "links": [{"label": "Open in the psych-cds risk dashboard", "type": "smart",
                   "url": f"{public_base_url}/dashboard/patient/{risk.patient_ref}",
                   "appContext": json.dumps({"patient": risk.patient_ref})}],
    }
    if risk.tier >= RiskTier.MODERATE:
        card["suggestions"] = [referral_suggestion(risk, suggestion_uuid)]
        card["selectionBehavior"] = "at-most-one"
    return card
