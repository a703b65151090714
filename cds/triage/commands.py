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
