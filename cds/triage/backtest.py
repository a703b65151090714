"""Backtest (pure part): how many alerts would a candidate rule set raise over stored history, against
the live one, per day and per rule. The lead's store code feeds it rows; nothing here does I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time

from tqdm import tqdm

from cds.domain import History, Signal, TriageOutcome

from .ruleset import ALERT_KINDS, RuleSet

PROGRESS_THRESHOLD = 1000  # rows; below this a progress bar is noise


@dataclass(frozen=True)
class BacktestRow:
    """One stored event's signals in the context the patient had then."""

    day: date
    patient_ref: str
    signals: Sequence[Signal]
    history: History
    now: datetime | None = None  # when the event was assessed; default: the end of ``day`` (UTC)

    @property
    def moment(self) -> datetime:
        return self.now or datetime.combine(self.day, time(23, 59, 59), tzinfo=UTC)


@dataclass
class AlertCounts:
    candidate: int = 0
    live: int = 0

    @property
    def delta(self) -> int:
        return self.candidate - self.live


@dataclass(frozen=True)
class BacktestReport:
    candidate_version: str
    candidate_hash: str
    live_version: str
    live_hash: str
    rows: int = 0
    by_day: dict[date, AlertCounts] = field(default_factory=dict)
    by_rule: dict[str, AlertCounts] = field(default_factory=dict)
    by_day_rule: dict[tuple[date, str], AlertCounts] = field(default_factory=dict)
    tier_higher: int = 0  # rows where the candidate's tier is above the live one
    tier_lower: int = 0

    @property
    def total(self) -> AlertCounts:
        return AlertCounts(sum(c.candidate for c in self.by_day.values()), sum(c.live for c in self.by_day.values()))

    def summary_lines(self) -> list[str]:
        total = self.total
        lines = [(f"candidate {self.candidate_version} ({self.candidate_hash[:12]}) vs live {self.live_version} "
                 f"({self.live_hash[:12]}) over {self.rows} events"),
                 (f"alerts: candidate {total.candidate}, live {total.live} (delta {total.delta:+d}); "
                 f"tier higher in {self.tier_higher}, lower in {self.tier_lower}")]
        for rule, counts in sorted(self.by_rule.items()):
            lines.append(f"  {rule}: candidate {counts.candidate}, live {counts.live} ({counts.delta:+d})")
        return lines


def _alerts_by_rule(outcome: TriageOutcome) -> dict[str, int]:
    out: dict[str, int] = {}
    for action in outcome.actions:
        if action.kind in ALERT_KINDS:
            rule = str(action.params.get("rule", "?"))
            out[rule] = out.get(rule, 0) + 1
    return out


def backtest(candidate: RuleSet, live: RuleSet, history_rows: Iterable[BacktestRow],
             progress: bool | None = None) -> BacktestReport:
    """Evaluate both rule sets on every row; count the alerts each would raise per day and per rule.

    A progress bar (stderr) shows when ``progress`` is True, or when it is None and there are at least
    PROGRESS_THRESHOLD rows (or the count is unknown, as with a database cursor).
    """
    if progress is None:
        progress = not isinstance(history_rows, Sized) or len(history_rows) >= PROGRESS_THRESHOLD
    report = BacktestReport(candidate.version, candidate.hash, live.version, live.hash)
    rows = 0
    higher = lower = 0
    for row in tqdm(history_rows, desc="backtest", unit="event", disable=not progress):
        rows += 1
        moment = row.moment
        outcomes = (candidate.evaluate(row.signals, row.history, moment),
                    live.evaluate(row.signals, row.history, moment))
        day = report.by_day.setdefault(row.day, AlertCounts())
        for which, outcome in zip(("candidate", "live"), outcomes):
            for rule, n in _alerts_by_rule(outcome).items():
                setattr(day, which, getattr(day, which) + n)
                for counts in (report.by_rule.setdefault(rule, AlertCounts()),
                               report.by_day_rule.setdefault((row.day, rule), AlertCounts())):
                    setattr(counts, which, getattr(counts, which) + n)
        higher += outcomes[0].tier > outcomes[1].tier
        lower += outcomes[0].tier < outcomes[1].tier
    return BacktestReport(report.candidate_version, report.candidate_hash, report.live_version, report.live_hash,
                          rows, report.by_day, report.by_rule, report.by_day_rule, higher, lower)
