"""The psychiatrist in a real browser, on the real stack: opens a patient from the ranked list, sees
the chat evidence highlighted and the banded trends, and overrides the assessment with a coded reason
(keyboard only for the form); the override is stored and the patient's tier stays."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cds.jobs import ingest_cycle
from tests.e2e.conftest import Stack, sign_in
from tests.samples import chat, patient, phq9

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
expect = sync_api.expect

pytestmark = pytest.mark.e2e

TEXT = "I have saved up the pills and I will take them all tonight"


def chart(stack: Stack) -> str:
    ref = f"Patient/{stack.ehr.create(patient(mrn='MRN-E-PSY'))['id']}"
    stack.ehr.create(phq9(ref, [1, 1, 1, 1, 0, 1, 0, 0, 1], authored="2026-11-19T03:00:00Z"))
    stack.ehr.create(chat(ref, TEXT, sent="2026-11-20T03:00:00Z"))
    ingest_cycle(stack.service)
    return ref


def test_psychiatrist_sees_highlighted_evidence_and_overrides_with_a_reason(stack: Stack, page: Any) -> None:
    ref = chart(stack)
    with stack.service.pool.connection() as conn:
        tier_before = conn.execute("SELECT current_tier FROM patients WHERE patient_ref = %s", (ref,)).fetchone()[0]
    sign_in(page, stack.create_user("psychiatrist"))
    expect(page).to_have_url(re.compile(r"/dashboard$"))
    row = page.locator(f'tr.patient-row[data-patient="{ref}"]')
    expect(row).to_be_visible()
    row.get_by_role("link", name=ref).click()
    expect(page.get_by_role("heading", level=1)).to_have_text(ref)

    marks = page.locator("ol.transcript mark.ev:not(.model_cue)")
    expect(marks.first).to_be_visible()
    assert all(m in TEXT for m in marks.all_inner_texts())
    expect(page.locator("#chart-phq9 line.band")).to_have_count(4)
    expect(page.locator("#chart-chat circle.point")).to_have_count(1)
    expect(page.locator(".tier-note")).to_contain_text("never changes the patient's risk tier")

    article = page.locator("article.assessment").first
    expect(article.locator("ul.fired li.rule").first).to_be_visible()
    form = article.locator("form.override")
    expect(form).to_be_visible()  # the newest, unreviewed assessment opens its review form
    form.get_by_label("Reason").focus()
    form.get_by_label("Reason").select_option("false-positive-idiom")
    form.get_by_label("Comment").fill("Quoting a song lyric; seen on the ward, settled")
    form.get_by_role("button", name="Override").focus()
    page.keyboard.press("Enter")

    expect(page.locator(".saved")).to_be_visible()
    review = page.locator("article.assessment li.review.override").first
    expect(review).to_contain_text("False positive: figure of speech")
    expect(review).to_contain_text("Quoting a song lyric")
    with stack.service.pool.connection() as conn:
        stored = conn.execute("SELECT decision, reason_code FROM assessment_overrides WHERE patient_ref = %s",
                              (ref,)).fetchall()
        tier_after = conn.execute("SELECT current_tier FROM patients WHERE patient_ref = %s", (ref,)).fetchone()[0]
    assert stored == [("override", "false-positive-idiom")] and tier_after == tier_before
    assert page.errors == []
