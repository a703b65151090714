"""``cds rules ...``: the click group the CLI registers (``cli.add_command(rules)``)."""

from __future__ import annotations

from pathlib import Path

import click

from cds.errors import RulesError
from cds.instruments import load_catalog

from .cases import run_cases
from .ruleset import DEFAULT_RULES_DIR, load_ruleset


@click.group("rules")
def rules() -> None:
    """Instrument definitions and triage-referral rules."""


@rules.command("check")
@click.option("--rules-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="rules directory (default: the packaged rules/)")
@click.option("-v", "--verbose", is_flag=True, help="list every case, not only failures")
def check(rules_dir: Path | None, verbose: bool) -> None:
    """Validate every instrument and rule against its schema and run every case; exit 1 on any failure."""
    root = (rules_dir or DEFAULT_RULES_DIR).resolve()
    failed = 0
    try:
        catalog = load_catalog(root)
        click.echo(f"instruments: {', '.join(f'{i.id}@{i.version}' for i in catalog)}")
    except RulesError as exc:
        click.echo(f"FAIL instruments: {exc}", err=True)
        failed += 1
    try:
        ruleset = load_ruleset(root / "triage", schema_dir=root / "schema")
        click.echo(f"rule set {ruleset.version} ({'shadow' if ruleset.shadow else 'live'}), "
                   f"{len(ruleset.rules)} rules, sha256 {ruleset.hash}")
    except RulesError as exc:
        click.echo(f"FAIL rules: {exc}", err=True)
        failed += 1
    results = run_cases(root)
    for result in results:
        if not result.passed:
            click.echo(f"FAIL {result.path}: {result.message}", err=True)
        elif verbose:
            click.echo(f"ok   {result.path}")
    bad = sum(1 for r in results if not r.passed)
    click.echo(f"cases: {len(results) - bad} passed, {bad} failed")
    if failed or bad:
        raise SystemExit(1)


@rules.command("backtest")
@click.option("--ruleset", "ruleset_path", required=True, type=click.Path(exists=True, path_type=Path),
              help="candidate rule set: a directory with ruleset.yaml (or the file)")
@click.option("--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="replay stored history from this day (default: all)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@click.pass_obj
def backtest_command(obj: dict[str, object], ruleset_path: Path, since: object, as_json: bool) -> None:
    """Replay stored history through a candidate rule set: alerts per day and per rule versus the live set."""
    import json
    from datetime import UTC

    from cds.store.assessments import iter_backtest_rows
    from cds.store.db import connect

    from .backtest import backtest

    candidate = load_ruleset(ruleset_path)
    live = load_ruleset()
    start = since.replace(tzinfo=UTC) if since is not None else None  # type: ignore[attr-defined]
    url = obj["db_url"]()  # type: ignore[operator]
    with connect(url) as conn:
        report = backtest(candidate, live, iter_backtest_rows(conn, start), progress=True)
    if as_json:
        click.echo(json.dumps({
            "candidate": {"version": report.candidate_version, "hash": report.candidate_hash},
            "live": {"version": report.live_version, "hash": report.live_hash}, "events": report.rows,
            "by_day": {d.isoformat(): {"candidate": c.candidate, "live": c.live} for d, c in sorted(report.by_day.items())},
            "by_rule": {r: {"candidate": c.candidate, "live": c.live} for r, c in sorted(report.by_rule.items())},
            "tier_higher": report.tier_higher, "tier_lower": report.tier_lower}, indent=2))
        return
    for line in report.summary_lines():
        click.echo(line)
    for day, counts in sorted(report.by_day.items()):
        click.echo(f"  {day.isoformat()}: candidate {counts.candidate}, live {counts.live} ({counts.delta:+d})")
