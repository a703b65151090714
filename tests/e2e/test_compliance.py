"""The compliance officer in a real browser: filters the audit log, verifies the chain and downloads
both exports; the pages show no patient text."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from compliance.export import CSV_COLUMNS
from tests.e2e.conftest import Stack, sign_in

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
expect = sync_api.expect

pytestmark = pytest.mark.e2e


def test_compliance_officer_filters_verifies_and_exports_the_log(stack: Stack, page: Any) -> None:
    officer = stack.create_user("compliance", wards=())
    sign_in(page, officer)
    expect(page).to_have_url(re.compile(r"/audit$"))

    page.get_by_label("User").fill(officer)
    page.get_by_label("Event type").fill("login")
    page.get_by_role("button", name="Apply").click()
    rows = page.locator("tr.audit-row")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-type", "login")
    expect(rows.first).to_contain_text(officer)

    page.get_by_role("button", name="Verify the chain").click()
    expect(page.locator(".verify-ok")).to_contain_text("The chain is intact")
    page.go_back()

    with page.expect_download() as csv_download:
        page.get_by_role("link", name="Export CSV").click()
    rows_csv = list(csv.reader(io.StringIO(Path(csv_download.value.path()).read_text(encoding="utf-8"))))
    assert tuple(rows_csv[0]) == CSV_COLUMNS and len(rows_csv) > 1
    with page.expect_download() as fhir_download:
        page.get_by_role("link", name="Export FHIR AuditEvents").click()
    bundle = json.loads(Path(fhir_download.value.path()).read_text(encoding="utf-8"))
    assert bundle["resourceType"] == "Bundle" and bundle["entry"]
    assert {e["resource"]["resourceType"] for e in bundle["entry"]} == {"AuditEvent"}

    page.get_by_role("link", name="Alert figures").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Alert figures")
    page.get_by_role("link", name="Rule and model changes").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Rule and model changes")
    with stack.service.pool.connection() as conn:
        exports = conn.execute("SELECT count(*) FROM audit_log WHERE event_type = 'export' AND actor = %s",
                               (officer,)).fetchone()[0]
    assert exports == 2
    assert page.errors == []
