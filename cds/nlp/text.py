"""Text helpers shared by the featuriser and the safety net: length-preserving normalisation,
script runs and language detection.

Offsets everywhere in cds.nlp are Python ``str`` indices (Unicode code points), so a normalised
string must have exactly the length of the original: ``normalise`` maps one character to one
character and never changes length.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

# CJK unified ideographs (+ extension A, compatibility ideographs), as half-open code point ranges.
_CJK_RANGES = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0xF900, 0xFB00))
_CJK_CLASS = "[" + "".join(f"{chr(lo)}-{chr(hi - 1)}" for lo, hi in _CJK_RANGES) + "]"
CJK_RE = re.compile(_CJK_CLASS + "+")
LATIN_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CJK_CHAR_RE = re.compile(_CJK_CLASS)
_LATIN_CHAR_RE = re.compile(r"[A-Za-z]")

# Apostrophe-like characters folded to "'" so "don’t" matches "don't".
_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\uff07": "'", "`": "'"}


@lru_cache(maxsize=1)
def traditional_to_simplified() -> dict[str, str]:
    """Traditional Chinese character -> its Simplified form (無->无, 殺->杀, 藥->药), from OpenCC's t2s
    conversion applied one character at a time: only one-to-one characters, so lengths never change.
    Characters OpenCC keeps (著, 乾 on its own) and every Simplified character map to themselves."""
    import opencc

    t2s = opencc.OpenCC("t2s")
    table: dict[str, str] = {}
    for lo, hi in _CJK_RANGES:
        for cp in range(lo, hi):
            ch = chr(cp)
            out = t2s.convert(ch)
            if len(out) == 1 and out != ch:
                table[ch] = out
    return table


# Written Cantonese characters with a one-character Mandarin counterpart, folded after Traditional ->
# Simplified so the lexicons and the model (both Mandarin) read 我唔想活落去 as 我不想活落去, 佢哋 as 他们,
# 鎅咗手 as 割了手. Only characters Mandarin text does not use (none occurs in the training data), so
# Mandarin input is unchanged; words whose counterpart is longer (冇 is 没有, 咁 is 这么) map to one character
# that keeps the meaning (冇 -> 没) or are left to the lexicon (听日 tomorrow, 头先 just now).
CANTONESE_TO_MANDARIN = {
    "咗": "了", "唔": "不", "冇": "没", "佢": "他", "哋": "们", "嘅": "的", "啲": "些", "喺": "在", "嚟": "来",
    "畀": "给", "攰": "累", "鎅": "割", "\U00020779": "割", "睇": "看", "谂": "想", "揾": "找", "瞓": "睡", "攞": "拿",
}  # keyed by the Simplified form where OpenCC has one (諗 -> 谂, 搵 -> 揾 are folded before this table)


@lru_cache(maxsize=65536)
def _fold_char(ch: str) -> str:
    if ch in _APOSTROPHES:
        return _APOSTROPHES[ch]
    folded = unicodedata.normalize("NFKC", ch).lower()
    if len(folded) == 1:
        folded = traditional_to_simplified().get(folded, folded)
        return CANTONESE_TO_MANDARIN.get(folded, folded)
    lowered = ch.lower()
    return lowered if len(lowered) == 1 else ch


def normalise(text: str) -> str:
    """NFKC + lower case + Traditional -> Simplified Chinese, character by character, so that
    ``len(normalise(t)) == len(t)``.

    Full-width Latin letters and digits become ASCII, curly apostrophes become ``'``, Traditional
    characters their Simplified forms and written Cantonese characters their Mandarin counterparts (the
    lexicons and the training data are Simplified Mandarin: "我唔想再活，想跳樓" reads as "我不想再活，想跳楼");
    characters whose normal form is longer than one character (ligatures, "ß" folding) are only lower-cased.
    """
    if text.isascii():
        return text.lower()
    return "".join(_fold_char(ch) for ch in text)


def detect_lang(text: str) -> str:
    """``"zh"`` when Chinese characters carry the text, else ``"en"`` (also for empty text).

    A Chinese character carries about as much as an English word, so one CJK character counts as
    four Latin letters: "我今天feel very bad" is zh, "I said 你好 to her" is en.
    """
    n_cjk = len(_CJK_CHAR_RE.findall(text))
    if n_cjk == 0:
        return "en"
    n_latin = len(_LATIN_CHAR_RE.findall(text))
    return "zh" if n_cjk * 4 >= n_latin else "en"


def has_cjk(text: str) -> bool:
    return _CJK_CHAR_RE.search(text) is not None


def has_latin(text: str) -> bool:
    return _LATIN_CHAR_RE.search(text) is not None
