"""Safety-net lexicon: explicit statements of intent, plan, means, timing, farewell and preparatory
acts that set a floor under the model's tier, in Chinese and English.

The lexicons are data (rules/lexicons/{zh,en}.yaml, each with id + version); this module only loads,
validates and applies them. A pattern match is *counted* unless a discount applies (negation, a third-
or second-person subject, quotation, an idiom) or, for ``context: true`` patterns, unless it lies near a
counted suicidal anchor. Counted matches become Evidence spans with offsets into the original text.

Tier of a scan (None when nothing suicidal was counted):
  max(tier of every counted pattern), raised to IMMINENT when means and timing are both counted.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from cds.domain import Evidence, RiskTier
from cds.errors import RulesError
from cds.nlp.text import detect_lang, has_cjk, has_latin, normalise

LEXICON_DIR = Path(__file__).resolve().parents[2] / "rules" / "lexicons"
LANGS = ("zh", "en")
SUICIDAL_KINDS = frozenset({"ideation", "plan", "means", "timing", "prior_attempt", "self_harm",
                            "preparatory_act", "farewell"})
ANCHOR_KINDS = SUICIDAL_KINDS - {"timing"}
KINDS = SUICIDAL_KINDS | {"aggression", "victimisation"}
DISCOUNTS = ("negation", "subject", "quotation", "idiom")
FLAGS = ("harm_to_others", "victimisation")

# Quote pairs; ASCII '"' toggles. Checked within the line only (posts are joined with newlines).
_SENTENCE_BREAKS = re.compile(r"[。！？!?；;\n]|[.](?=\s|$)")
_QUOTE_PAIRS = (("“", "”"), ("「", "」"), ("『", "』"), ("《", "》"), ("〈", "〉"))


@dataclass(frozen=True)
class Pattern:
    id: str
    kind: str
    regex: re.Pattern[str]
    tier: RiskTier | None
    flag: str | None
    context: bool
    discount: frozenset[str]
    anchor_tier: RiskTier | None = None  # context: true only: counts only near an anchor of at least this tier


@dataclass(frozen=True)
class Obfuscation:
    """How writers break up a risk word to get past a keyword filter (自 杀, 自.杀, k i l l, k1ll, d*e), as the
    lexicon declares it (``obfuscation:``). ``split``: characters dropped from the second reading; ``leet``: a
    digit or symbol read as the letter it stands for inside a word (character -> letter); ``masked``: words a
    run of ``*`` may stand in for, letter for letter (d*e -> die)."""

    split: re.Pattern[str] | None
    leet: Mapping[str, str]
    masked: tuple[str, ...]


@dataclass(frozen=True)
class Lexicon:
    id: str
    version: str
    lang: str
    title: str
    patterns: tuple[Pattern, ...]
    idioms: tuple[re.Pattern[str], ...]
    negation_cues: re.Pattern[str]
    negation_breaks: re.Pattern[str]
    clause_breaks: re.Pattern[str]
    first_person: re.Pattern[str]
    second_person: re.Pattern[str]
    third_person: re.Pattern[str]
    object_markers: re.Pattern[str] | None  # a second/third-person word right after one is an object, not a subject
    possessive_markers: re.Pattern[str] | None  # a second/third-person word right before one is a possessor (你们的评论)
    negation_window: int
    context_window: int
    obfuscation: Obfuscation | None = None
    any_pattern: re.Pattern[str] | None = None  # with obfuscation: every pattern and idiom in one alternation

    @property
    def ref(self) -> str:
        return f"lexicon:{self.lang}@{self.version}"

    @property
    def persons(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        """(person, subject words) for first, second and third person, in that order."""
        return (("first", self.first_person), ("second", self.second_person), ("third", self.third_person))


@dataclass(frozen=True)
class Hit:
    """One pattern match and what became of it (``status`` "counted" or the discount that applied)."""

    start: int
    end: int
    kind: str
    pattern_id: str
    status: str  # counted | negation | third_person | second_person | quotation | idiom | no_context
    lexicon: str  # lexicon ref, e.g. "lexicon:zh@1.0.0"
    tier: RiskTier | None = None
    flag: str | None = None

    @property
    def counted(self) -> bool:
        return self.status == "counted"


@dataclass(frozen=True)
class SafetyNetResult:
    tier: RiskTier | None  # None: nothing suicidal counted
    kinds: tuple[str, ...]  # counted kinds, sorted
    evidence: tuple[Evidence, ...]  # counted hits, in text order (ref empty; source = lexicon ref)
    hits: tuple[Hit, ...]  # every match, counted or discounted (for explanation and tests)
    harm_to_others: bool
    victimisation: bool
    lexicons: tuple[str, ...]  # refs of the lexicons applied

    @property
    def fired(self) -> bool:
        return bool(self.evidence)


def _compile(expr: Any, where: str, *, line_local: bool = False) -> re.Pattern[str]:
    if not isinstance(expr, str) or not expr:
        raise RulesError(f"{where}: expected a non-empty regular expression")
    try:
        rx = re.compile(expr)
    except re.error as exc:
        raise RulesError(f"{where}: invalid regular expression: {exc}") from exc
    if line_local:
        why = line_crossing(expr)
        if why is not None:
            raise RulesError(f"{where}: a pattern must stay within one line (a conversation is scanned message "
                             f"by message), but it {why}")
    return rx


# What each character-class category says about a line break ("\n").
_CATEGORY_HAS_NEWLINE = {name: re.match(rx, "\n") is not None for name, rx in (
    ("CATEGORY_DIGIT", r"\d"), ("CATEGORY_NOT_DIGIT", r"\D"), ("CATEGORY_SPACE", r"\s"),
    ("CATEGORY_NOT_SPACE", r"\S"), ("CATEGORY_WORD", r"\w"), ("CATEGORY_NOT_WORD", r"\W"))}


def line_crossing(expr: str) -> str | None:
    """Why ``expr`` could match or look across a line break (None when it cannot): a character that
    can be a line break (``\\n``, ``\\s``, ``[^x]``, ``.`` under DOTALL), also inside a look-around, or a
    ``^``/``$``/``\\A``/``\\Z`` anchor (which a message and the conversation it is part of see differently).
    Word boundaries are fine: a line break and the end of the text are both non-word."""
    import importlib

    sre: Any = importlib.import_module("re._constants")  # the parser behind re.compile (no public API)
    parsed = importlib.import_module("re._parser").parse(expr)

    def category_has_newline(cat: Any) -> bool:
        name = str(cat).replace("UNI_", "")
        if name not in _CATEGORY_HAS_NEWLINE:
            raise ValueError(name)
        return _CATEGORY_HAS_NEWLINE[name]

    def in_has_newline(items: Any) -> bool:
        negate, found = False, False
        for op, av in items:
            if op is sre.NEGATE:
                negate = True
            elif op is sre.LITERAL:
                found |= av == 10
            elif op is sre.RANGE:
                found |= av[0] <= 10 <= av[1]
            elif op is sre.CATEGORY:
                found |= category_has_newline(av)
            else:
                raise ValueError(str(op))
        return found != negate

    def walk(items: Any, dotall: bool) -> str | None:
        for op, av in items:
            if op is sre.LITERAL:
                bad = av == 10
            elif op is sre.NOT_LITERAL:
                bad = av != 10
            elif op is sre.ANY:
                bad = dotall
            elif op is sre.IN:
                bad = in_has_newline(av)
            elif op is sre.AT:
                if av in (sre.AT_BOUNDARY, sre.AT_NON_BOUNDARY):
                    continue
                return "uses a start/end anchor (^, $, \\A or \\Z)"
            elif op is sre.BRANCH:
                for branch in av[1]:
                    if (why := walk(branch, dotall)) is not None:
                        return why
                continue
            elif op is sre.SUBPATTERN:
                _, add, remove, sub = av
                on = (dotall or bool(add & sre.SRE_FLAG_DOTALL)) and not remove & sre.SRE_FLAG_DOTALL
                if (why := walk(sub, on)) is not None:
                    return why
                continue
            elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
                if (why := walk(av[2], dotall)) is not None:
                    return why
                continue
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                if (why := walk(av[1], dotall)) is not None:
                    return why
                continue
            elif op is sre.ATOMIC_GROUP:
                if (why := walk(av, dotall)) is not None:
                    return why
                continue
            elif op is sre.GROUPREF:
                continue  # repeats what its group matched, which is checked where the group is
            else:
                return f"uses {op}, which this check does not know"
            if bad:
                return "can match a line break"
        return None

    try:
        return walk(parsed, bool(parsed.state.flags & sre.SRE_FLAG_DOTALL))
    except ValueError as exc:
        return f"uses {exc}, which this check does not know"


FRAGMENT_RE = re.compile(r"\{\{(\w+)\}\}")


def _fragments(data: Any, where: str) -> dict[str, str]:
    """Named sub-expressions a pattern may use as ``{{name}}`` (a list of people, of harmful verbs ...), so one
    list serves every pattern that needs it. A fragment is a regular expression of its own (checked here) and
    does not use other fragments."""
    if not isinstance(data, Mapping):
        raise RulesError(f"{where}: fragments must map names to regular expressions")
    out: dict[str, str] = {}
    for name, expr in data.items():
        if not re.fullmatch(r"\w+", str(name)):
            raise RulesError(f"{where}: fragment name {name!r} must be letters, digits or _")
        fw = f"{where}: fragments.{name}"
        if isinstance(expr, str) and FRAGMENT_RE.search(expr):
            raise RulesError(f"{fw}: a fragment cannot use another fragment")
        _compile(expr, fw, line_local=True)
        out[str(name)] = str(expr)
    return out


def _expand(expr: Any, fragments: Mapping[str, str], where: str) -> Any:
    """``{{name}}`` in a pattern's regex replaced by its fragment, as a non-capturing group."""
    if not isinstance(expr, str):
        return expr

    def one(m: re.Match[str]) -> str:
        if m.group(1) not in fragments:
            raise RulesError(f"{where}: unknown fragment {{{{{m.group(1)}}}}}; known: {sorted(fragments)}")
        return f"(?:{fragments[m.group(1)]})"
    return FRAGMENT_RE.sub(one, expr)


def parse_lexicon(data: Mapping[str, Any], where: str = "lexicon") -> Lexicon:
    """Validate a lexicon document; raises RulesError naming the first problem."""
    for key in ("id", "version", "lang", "patterns", "subjects", "negation_cues", "negation_breaks",
                "clause_breaks"):
        if key not in data:
            raise RulesError(f"{where}: missing required key {key!r}")
    if data["lang"] not in LANGS:
        raise RulesError(f"{where}: lang must be one of {LANGS}, got {data['lang']!r}")
    if not re.fullmatch(r"\d+\.\d+\.\d+", str(data["version"])):
        raise RulesError(f"{where}: version must be semantic (1.2.3), got {data['version']!r}")
    settings = data.get("settings") or {}
    fragments = _fragments(data.get("fragments") or {}, where)
    patterns: list[Pattern] = []
    seen: set[str] = set()
    for i, p in enumerate(data["patterns"]):
        pw = f"{where}: patterns[{i}]"
        if not isinstance(p, Mapping) or "id" not in p or "kind" not in p or "regex" not in p:
            raise RulesError(f"{pw}: each pattern needs id, kind and regex")
        pid = str(p["id"])
        if pid in seen:
            raise RulesError(f"{pw}: duplicate pattern id {pid!r}")
        seen.add(pid)
        kind = str(p["kind"])
        if kind not in KINDS:
            raise RulesError(f"{pw} ({pid}): unknown kind {kind!r}; expected one of {sorted(KINDS)}")
        tier = RiskTier.from_label(str(p["tier"])) if p.get("tier") else None
        flag = p.get("flag")
        if flag is not None and flag not in FLAGS:
            raise RulesError(f"{pw} ({pid}): unknown flag {flag!r}")
        if (kind in SUICIDAL_KINDS) != (tier is not None):
            raise RulesError(f"{pw} ({pid}): suicidal kinds need a tier, flag kinds must not have one")
        if tier is None and flag is None:
            raise RulesError(f"{pw} ({pid}): pattern sets neither a tier nor a flag")
        discount = frozenset(p.get("discount", DISCOUNTS))
        if not discount <= set(DISCOUNTS):
            raise RulesError(f"{pw} ({pid}): unknown discount in {sorted(discount)}")
        regex = _expand(p["regex"], fragments, f"{pw} ({pid})")
        context = bool(p.get("context", False))
        anchor_tier = None
        if p.get("anchor_tier") is not None:
            if not context:
                raise RulesError(f"{pw} ({pid}): anchor_tier goes with context: true")
            try:
                anchor_tier = RiskTier.from_label(str(p["anchor_tier"]))
            except (KeyError, ValueError) as exc:
                raise RulesError(f"{pw} ({pid}): unknown anchor_tier {p['anchor_tier']!r}") from exc
        patterns.append(Pattern(id=pid, kind=kind, regex=_compile(regex, f"{pw} ({pid})", line_local=True), tier=tier,
                                flag=flag, context=context, discount=discount, anchor_tier=anchor_tier))
    for key in ("negation_breaks", "clause_breaks"):
        if isinstance(data[key], str) and re.fullmatch(data[key], "\n") is None:
            raise RulesError(f"{where}: {key} must include the line break (\\n): a scope never crosses a line")
    subjects = data["subjects"]
    obfuscation = _parse_obfuscation(data.get("obfuscation"), where)
    idioms = tuple(_compile(x, f"{where}: idioms[{i}]", line_local=True) for i, x in enumerate(data.get("idioms") or ()))
    return Lexicon(
        id=str(data["id"]), version=str(data["version"]), lang=str(data["lang"]), title=str(data.get("title", "")),
        patterns=tuple(patterns),
        idioms=idioms,
        negation_cues=_compile(data["negation_cues"], f"{where}: negation_cues"),
        negation_breaks=_compile(data["negation_breaks"], f"{where}: negation_breaks"),
        clause_breaks=_compile(data["clause_breaks"], f"{where}: clause_breaks"),
        first_person=_compile(subjects.get("first"), f"{where}: subjects.first"),
        second_person=_compile(subjects.get("second"), f"{where}: subjects.second"),
        third_person=_compile(subjects.get("third"), f"{where}: subjects.third"),
        object_markers=_compile(f"(?:{subjects['object_markers']})$", f"{where}: subjects.object_markers")
        if subjects.get("object_markers") else None,
        possessive_markers=_compile(f"(?:{subjects['possessive_markers']})", f"{where}: subjects.possessive_markers")
        if subjects.get("possessive_markers") else None,
        negation_window=int(settings.get("negation_window", 20)),
        context_window=int(settings.get("context_window", 200)),
        obfuscation=obfuscation,
        # One alternation of every pattern and idiom, to tell cheaply whether a second reading can find anything
        # (the lexicons use no named groups or back-references, which an alternation would break).
        any_pattern=re.compile("|".join(f"(?:{rx.pattern})" for rx in (*(p.regex for p in patterns), *idioms)))
        if obfuscation is not None else None,
    )


def _parse_obfuscation(data: Any, where: str) -> Obfuscation | None:
    if not data:
        return None
    if not isinstance(data, Mapping) or not set(data) <= {"split", "leet", "masked"}:
        raise RulesError(f"{where}: obfuscation takes split, leet and masked")
    leet = data.get("leet") or {}
    if not isinstance(leet, Mapping) or any(len(str(k)) != 1 or not re.fullmatch(r"[a-z]", str(v))
                                            for k, v in leet.items()):
        raise RulesError(f"{where}: obfuscation.leet maps one character to one letter (\"1\": i)")
    masked = data.get("masked") or []
    if not isinstance(masked, list) or any(not re.fullmatch(r"[a-z]+", str(w)) for w in masked):
        raise RulesError(f"{where}: obfuscation.masked is a list of lower-case words")
    split = _compile(data["split"], f"{where}: obfuscation.split", line_local=True) if data.get("split") else None
    return Obfuscation(split=split, leet={str(k): str(v) for k, v in leet.items()},
                       masked=tuple(str(w) for w in masked))


def load_lexicon(path: Path) -> Lexicon:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RulesError(f"safety-net lexicon {path} not found") from exc
    except yaml.YAMLError as exc:
        raise RulesError(f"safety-net lexicon {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise RulesError(f"safety-net lexicon {path}: expected a mapping at the top level")
    return parse_lexicon(data, where=str(path))


@lru_cache(maxsize=8)
def lexicons(lexicon_dir: Path = LEXICON_DIR) -> dict[str, Lexicon]:
    """The zh and en lexicons (loaded once per directory)."""
    out = {lang: load_lexicon(lexicon_dir / f"{lang}.yaml") for lang in LANGS}
    for lang, lex in out.items():
        if lex.lang != lang:
            raise RulesError(f"{lexicon_dir / (lang + '.yaml')}: declares lang {lex.lang!r}")
    return out


class _Doc:
    """A normalised text with the break positions each check needs, computed once per scan."""

    def __init__(self, norm: str, lex: Lexicon) -> None:
        self.norm = norm
        self.clause_ends = [m.end() for m in lex.clause_breaks.finditer(norm)]
        self.neg_ends = [m.end() for m in lex.negation_breaks.finditer(norm)]
        self.sentence_ends = [m.end() for m in _SENTENCE_BREAKS.finditer(norm)]

    @staticmethod
    def _start(ends: list[int], pos: int) -> int:
        i = bisect.bisect_right(ends, pos) - 1
        return ends[i] if i >= 0 else 0

    def clause_start(self, pos: int) -> int:
        return self._start(self.clause_ends, pos)

    def sentence_start(self, pos: int) -> int:
        return self._start(self.sentence_ends, pos)

    def negation_start(self, pos: int) -> int:
        return self._start(self.neg_ends, pos)


def _last_subject(lex: Lexicon, prefix: str) -> str | None:
    best: tuple[int, str] | None = None
    for person, rx in lex.persons:
        for m in rx.finditer(prefix):
            # "经常和家人吵架，之后就想自杀": 家人 is the object of 和, not who wants to die; "看了你们的评论 越来越想割腕":
            # 你们 owns the comments. Only other people are skipped this way, never the speaker, so the rule
            # can only count a match, never discount one.
            if person != "first" and (
                    (lex.object_markers is not None and lex.object_markers.search(prefix, 0, m.start()))
                    or (lex.possessive_markers is not None and lex.possessive_markers.match(prefix, m.end()))):
                continue
            if best is None or m.end() > best[0] or (m.end() == best[0] and person == "first"):
                best = (m.end(), person)
    return best[1] if best else None


def _sentence_subject(lex: Lexicon, doc: _Doc, start: int) -> str | None:
    """Who a clause without a subject of its own is about: the last subject earlier in the sentence
    ("我的一个朋友失恋了，要自杀"), unless the sentence opens with a clause that has none either. Then the
    sentence is the speaker's own narrative with the pronoun dropped, as Chinese does ("14岁，心事也从不敢对别人说，刚差点
    跳楼了"), and a person named in a middle clause is not who the clause is about. Like the object rule, this can
    only count a match, never discount one."""
    s0 = doc.sentence_start(start)
    i = bisect.bisect_right(doc.clause_ends, s0)
    first_clause_end = doc.clause_ends[i] if i < len(doc.clause_ends) and doc.clause_ends[i] <= start else start
    if first_clause_end < start and _last_subject(lex, doc.norm[s0:first_clause_end]) is None:
        # ... but a clause that opens with someone right before this one is a topic chain about them
        # ("所以最后，他们身心俱疲，选择离开这个世界"; "昨天很累，朋友失恋了，要自杀").
        c = doc.clause_start(start)
        before = doc.clause_start(c - 1) if c > s0 else c
        while before < c and doc.norm[before].isspace():
            before += 1
        if _opening_subject(lex, doc.norm, before) in (None, "first"):
            return "first"
    return _last_subject(lex, doc.norm[s0:start])


def _opening_subject(lex: Lexicon, norm: str, start: int) -> str | None:
    """The person of a subject word the match starts with, if any."""
    for person, rx in lex.persons:
        if rx.match(norm, start):
            return person
    return None


def _first_subject(lex: Lexicon, prefix: str) -> str | None:
    """The reporting speaker: "I told my mum" -> first, "My mum told me" -> third."""
    best: tuple[int, str] | None = None
    for person, rx in lex.persons:
        m = rx.search(prefix)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), person)
    return best[1] if best else None


CUE_LOOKAHEAD = 16


def _negated(lex: Lexicon, doc: _Doc, start: int, opener: str | None) -> bool:
    """``opener``: the person of a subject word the match starts with (``_opening_subject``), if any."""
    lo = max(doc.negation_start(start), start - lex.negation_window)
    cue = None
    # Searched in the whole text, so a cue's look-arounds see the words around it, the match included:
    # 特别 is not 别, 有没有 is not 没, 忍不住 is not 不, and 就不能割手了 (can no longer) is not a denial. A cue
    # counts when it ends before the match; its look-ahead sees up to CUE_LOOKAHEAD characters past the match start.
    for m in lex.negation_cues.finditer(doc.norm, lo, start + CUE_LOOKAHEAD):
        if m.end() > start:
            break
        cue = m
    if cue is None:
        return False
    between = doc.norm[cue.end():start]
    # "I don't know, I want to die" / "过得不爽了你们都得死": a new subject after the cue ends its scope,
    # and so does one the match itself opens with ("不爽了" + "你们都得死": the cue negates 爽, not 死).
    return opener is None and not any(rx.search(between) for _, rx in lex.persons)


def _quote_open(doc: _Doc, start: int) -> int:
    """Position of the quotation mark that ``start`` lies inside (same line), or -1."""
    line_start = doc.norm.rfind("\n", 0, start) + 1
    line = doc.norm[line_start:start]
    open_at = -1
    if line.count('"') % 2 == 1:
        open_at = line.rfind('"')
    for o, c in _QUOTE_PAIRS:
        if line.count(o) > line.count(c):
            open_at = max(open_at, line.rfind(o))
    return line_start + open_at if open_at >= 0 else -1


def _status(lex: Lexicon, doc: _Doc, pat: Pattern, start: int, end: int,
            idiom_spans: list[tuple[int, int]]) -> str:
    if "idiom" in pat.discount and any(s < end and start < e for s, e in idiom_spans):
        return "idiom"
    open_at = _quote_open(doc, start) if "quotation" in pat.discount else -1
    if open_at >= 0:
        # 'I told her "I want to die"' / 我跟妈妈说“我想死”: the speaker quotes themself.
        quoter = _first_subject(lex, doc.norm[max(doc.clause_start(open_at), open_at - 30):open_at])
        if quoter != "first":
            return "quotation"
    opener = _opening_subject(lex, doc.norm, start)  # read by both checks below
    if "subject" in pat.discount:
        lo = open_at + 1 if open_at >= 0 else doc.clause_start(start)
        # A match that opens with the speaker ("我先走一步") is the speaker's, whoever was named before it; a
        # match that opens with someone else ("everyone would be better off without me") is judged as before.
        subject = "first" if opener == "first" else _last_subject(lex, doc.norm[lo:start])
        if subject is None and open_at < 0:  # "我的一个朋友失恋了，要自杀": the subject may sit in an earlier clause
            subject = _sentence_subject(lex, doc, start)
        if subject == "third":
            return "third_person"
        if subject == "second":
            return "second_person"
    if "negation" in pat.discount and _negated(lex, doc, start, opener):
        return "negation"
    return "counted"


def _apply_context(hits: list[Hit], lexs: Mapping[str, Lexicon]) -> list[Hit]:
    """A counted ``context: true`` hit stays counted only near a counted anchor of either lexicon (of at
    least the pattern's ``anchor_tier`` where it names one: a time word counts beside intent, not beside a
    passive wish, so 活着没意思 ... 今天考试压力好大 is not a timed plan)."""
    by_ref = {lx.ref: lx for lx in lexs.values()}
    context = {p.id: p for lx in lexs.values() for p in lx.patterns if p.context}
    anchor_hits = sorted((h.start, int(h.tier or 0)) for h in hits
                         if h.counted and h.kind in ANCHOR_KINDS and h.pattern_id not in context)
    starts = {t: [s0 for s0, at in anchor_hits if at >= t] for t in {int(p.anchor_tier or 0) for p in context.values()}}
    out: list[Hit] = []
    for h in hits:
        if h.counted and h.pattern_id in context:
            window = by_ref[h.lexicon].context_window
            anchors = starts[int(context[h.pattern_id].anchor_tier or 0)]
            i = bisect.bisect_left(anchors, h.start - window)
            if i >= len(anchors) or anchors[i] > h.end + window:
                h = Hit(h.start, h.end, h.kind, h.pattern_id, "no_context", h.lexicon, h.tier, h.flag)
        out.append(h)
    return out


# A Latin word with a digit or one of the symbols leet and masks use next to a letter (k1ll, d*e, 3nd).
_TOKEN = re.compile(r"[a-z0-9*!@$]*(?:[a-z][0-9*!@$]|[0-9*!@$][a-z])[a-z0-9*!@$]*")


@dataclass(frozen=True)
class _View:
    """The second reading of a normalised text: ``text``, and for each of its characters where it comes from
    (``origin``), whether it was read differently (``substituted``) and whether dropped characters sit just
    before it (``joined``)."""

    text: str
    origin: list[int]
    substituted: list[bool]
    joined: list[bool]

    def changes(self, start: int, end: int) -> bool:
        """Whether the match [start, end) of the view reads a character differently or across a dropped run."""
        return any(self.substituted[start:end]) or any(self.joined[start + 1:end])


def _unobfuscated(ob: Obfuscation, norm: str) -> _View | None:
    """``norm`` with the lexicon's split characters dropped, and leet characters and masks inside a word read
    as letters; None when nothing is undone (the usual case: one regex search and one token scan)."""
    chars = list(norm)
    substituted = [False] * len(norm)
    if ob.leet or ob.masked:
        for m in _TOKEN.finditer(norm):
            word = m.group()
            new = list(word)
            for i, c in enumerate(word[:-1]):  # never the last character: "die!" is an exclamation
                if c in ob.leet and (i == 0 or word[i - 1].isalpha() or word[i - 1] in ob.leet) \
                        and (word[i + 1].isalpha() or word[i + 1] in ob.leet):
                    new[i] = ob.leet[c]
            if "*" in word:
                fits = [w for w in ob.masked if len(w) == len(word)
                        and all(c in ("*", w[i]) or ob.leet.get(c) == w[i] for i, c in enumerate(word))]
                if len(fits) == 1:
                    new = list(fits[0])
            for i, c in enumerate(new):
                if c != word[i]:
                    chars[m.start() + i] = c
                    substituted[m.start() + i] = True
    dropped = [False] * len(norm)
    if ob.split is not None:
        for m in ob.split.finditer(norm):
            dropped[m.start():m.end()] = [True] * (m.end() - m.start())
    if not any(substituted) and not any(dropped):
        return None
    keep = [i for i in range(len(norm)) if not dropped[i]]
    return _View(text="".join(chars[i] for i in keep), origin=keep, substituted=[substituted[i] for i in keep],
                 joined=[j > 0 and dropped[i - 1] for j, i in enumerate(keep)])


# The search below starts this far before a change. A longer match that starts further back and reads the change
# would be missed; the longest match in the 7,852 texts of the data sets and tests is 53 characters.
CHANGE_REACH = 80


def _may_match_a_change(lex: Lexicon, view: _View) -> bool:
    """Whether a match could read a changed character: a search of all patterns at once, from CHANGE_REACH before
    a change, finds a match starting at or before it. Most split characters are spaces between clauses with no
    risk word near them, and then the second reading is not scanned at all. Each search stops 3 * CHANGE_REACH
    past its change and the next one starts where it left off, so a long text with many changes is read about
    three times, not once per change. It may answer True where no match reads a change (the scan then finds
    nothing to add), never False where one does."""
    rx = lex.any_pattern
    if rx is None:
        return True
    text = view.text
    clear_to = -1  # no match starts at or before this position
    for j in range(len(text)):
        if not (view.substituted[j] or view.joined[j]) or j <= clear_to:
            continue
        m = rx.search(text, max(0, j - CHANGE_REACH, clear_to + 1), j + 3 * CHANGE_REACH)
        if m is not None and m.start() <= j:
            return True
        clear_to = m.start() - 1 if m is not None else j + CHANGE_REACH
    return False


def _scan_unobfuscated(lex: Lexicon, norm: str) -> list[Hit]:
    """The hits only the second reading finds (each reads a changed character or across a dropped one), in
    ``norm``'s offsets. Their discounts are judged in that reading: 我不想自 杀 is negated as 我不想自杀 is."""
    view = _unobfuscated(lex.obfuscation, norm) if lex.obfuscation is not None else None
    if view is None or not _may_match_a_change(lex, view):
        return []
    return [Hit(view.origin[h.start], view.origin[h.end - 1] + 1, h.kind, h.pattern_id, h.status, h.lexicon,
                h.tier, h.flag)
            for h in _scan_text(lex, view.text, view.changes)]


def _scan_lexicon(lex: Lexicon, norm: str) -> list[Hit]:
    return _scan_text(lex, norm) + _scan_unobfuscated(lex, norm)


def _scan_text(lex: Lexicon, norm: str, keep: Callable[[int, int], bool] | None = None) -> list[Hit]:
    """Every pattern and idiom match in ``norm`` with its status; with ``keep``, only the matches it accepts
    (judged before their discounts are, which cost most of a scan)."""
    doc = _Doc(norm, lex)
    idiom_spans = [(m.start(), m.end()) for rx in lex.idioms for m in rx.finditer(norm)]
    hits: list[Hit] = []
    for pat in lex.patterns:
        for m in pat.regex.finditer(norm):
            if m.end() <= m.start() or (keep is not None and not keep(m.start(), m.end())):
                continue
            hits.append(Hit(start=m.start(), end=m.end(), kind=pat.kind, pattern_id=pat.id,
                            status=_status(lex, doc, pat, m.start(), m.end(), idiom_spans),
                            lexicon=lex.ref, tier=pat.tier, flag=pat.flag))
    # Idioms are recorded too (never counted), so callers can tell "explained away" from "nothing found".
    hits += [Hit(start=s0, end=e0, kind="idiom", pattern_id="idiom", status="idiom", lexicon=lex.ref)
             for s0, e0 in sorted(set(idiom_spans)) if keep is None or keep(s0, e0)]
    return hits


def _dedupe(hits: list[Hit]) -> list[Hit]:
    """Drop a counted hit contained in another counted hit of the same kind."""
    counted = [h for h in hits if h.counted]
    keep: list[Hit] = []
    for h in hits:
        if h.counted and any(o is not h and o.kind == h.kind and o.start <= h.start and h.end <= o.end
                             and (o.end - o.start) > (h.end - h.start) for o in counted):
            continue
        keep.append(h)
    seen: set[tuple[int, int, str, str]] = set()
    out = []
    for h in sorted(keep, key=lambda h: (h.start, h.end, h.kind, h.pattern_id)):
        key = (h.start, h.end, h.kind, h.status)
        if key not in seen:
            seen.add(key)
            out.append(h)
    return out


def tier_of(kinds: Sequence[str], hits: Sequence[Hit]) -> RiskTier | None:
    tiers = [h.tier for h in hits if h.counted and h.tier is not None]
    if not tiers:
        return None
    tier = max(tiers)
    if "means" in kinds and "timing" in kinds:
        tier = RiskTier.IMMINENT
    return tier


def _languages(text: str, lang: str | None) -> list[str]:
    """The lexicons that apply to ``text``: the one for ``lang`` (or the detected language) and, for mixed
    text, the other one too (Chinese characters -> zh lexicon, Latin letters -> en)."""
    primary = lang if lang in LANGS else detect_lang(text)
    other = "en" if primary == "zh" else "zh"
    if (other == "zh" and has_cjk(text)) or (other == "en" and has_latin(text)):
        return [primary, other]
    return [primary]


CACHED_MESSAGE_CHARS = 2000  # longer messages (rare in chat) are scanned each time rather than kept


@lru_cache(maxsize=131072)
def _cached_message_hits(lexicon_dir: Path, code: str, norm: str) -> tuple[Hit, ...]:
    return tuple(_scan_lexicon(lexicons(lexicon_dir)[code], norm))


def _message_hits(lexicon_dir: Path, code: str, norm: str) -> tuple[Hit, ...]:
    """One lexicon's raw hits (before context and de-duplication) in one normalised message. Cached for
    chat-sized messages: a conversation's earlier messages are scanned again with each new one."""
    if len(norm) > CACHED_MESSAGE_CHARS:
        return tuple(_scan_lexicon(lexicons(lexicon_dir)[code], norm))
    return _cached_message_hits(lexicon_dir, code, norm)


def conversation_hits(messages: Sequence[str], lang: str | None = None,
                      lexicon_dir: Path = LEXICON_DIR) -> list[Hit]:
    """The hits of ``"\\n".join(messages)``, with offsets into that joined text, found message by message.

    Exactly what scanning the joined text finds: no pattern or idiom can match or look across a line
    break (``parse_lexicon`` refuses one that could), and every negation, subject and clause scope ends at
    one (the break patterns include ``\\n``); what does cross messages, a ``context: true`` pattern near an
    anchor in another message, is applied to the whole conversation after. Each message's own scan is
    cached, so a conversation of n messages costs one new message's scan, not n."""
    joint = "\n".join(messages)
    if not joint:
        return []
    lex = lexicons(lexicon_dir)
    norms = [normalise(m) for m in messages]
    hits: list[Hit] = []
    for code in _languages(joint, lang):
        start = 0
        for norm in norms:
            for h in _message_hits(lexicon_dir, code, norm):
                hits.append(h if start == 0 else
                            Hit(h.start + start, h.end + start, h.kind, h.pattern_id, h.status, h.lexicon, h.tier,
                                h.flag))
            start += len(norm) + 1
    return _dedupe(_apply_context(hits, lex))


def result_from_hits(text: str, hits: Sequence[Hit], langs_used: Sequence[str]) -> SafetyNetResult:
    counted = [h for h in hits if h.counted]
    kinds = tuple(sorted({h.kind for h in counted}))
    evidence = tuple(Evidence(start=h.start, end=h.end, kind=h.kind, source=h.lexicon, text=text[h.start:h.end])
                     for h in counted)
    return SafetyNetResult(tier=tier_of(kinds, counted), kinds=kinds, evidence=evidence, hits=tuple(hits),
                           harm_to_others=any(h.flag == "harm_to_others" for h in counted),
                           victimisation=any(h.flag == "victimisation" for h in counted),
                           lexicons=tuple(sorted(set(langs_used))))


def conversation_scan(messages: Sequence[str], lang: str | None = None,
                      lexicon_dir: Path = LEXICON_DIR) -> SafetyNetResult:
    """The safety net on a conversation joined by line breaks (offsets into the joined text)."""
    hits = conversation_hits(messages, lang, lexicon_dir)
    return result_from_hits("\n".join(messages), hits, sorted({h.lexicon for h in hits}))


def safety_net_scan(text: str, lang: str | None = None, lexicon_dir: Path = LEXICON_DIR) -> SafetyNetResult:
    """Scan one text (any length: the whole text is scanned) with the safety-net lexicons."""
    return conversation_scan([text], lang, lexicon_dir)
