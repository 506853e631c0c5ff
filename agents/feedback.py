"""The study assistant's feedback: parse its ``{reason, guideline}`` reply and keep the gold answer out of it.

A small student copies whatever answer letter or option text it is shown, so feedback that names the gold
would teach nothing and inflate accuracy. Like the SALAM paper, leaks are found with patterns; a leaking
sentence is dropped (the rest of the feedback is kept) and the leak is counted.

Stored guidelines come back as guidance on other questions, so a sentence that says something of a social group
("The Black student has an absent father.") is dropped the same way and counted: a sentence naming a group is kept
only where it warns against assuming (it says not, assume, stereotype, evidence, stated ...). A guideline left
of one word or none is replaced by a neutral one, and that is counted too (``generic``). A sentence that restates
the assistant's own instructions ("Never name the correct option letter ...") advises on nothing and is dropped and
counted as well (``echoed``): the 1.5B teacher copied one into 6-8 of ~70 gathering turns on BBH.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from agents.prompts import feedback_guidance, load_prompt
from runtime.data.kinds import kind_of
from runtime.data.tasks import Example

FALLBACK_GUIDELINE = "Re-read the question, check each option against the facts stated, and answer only from them."


@dataclass(frozen=True)
class Feedback:
    reason: str
    guideline: str
    parsed: bool  # the reply was the JSON (or labelled lines) asked for
    leaked: bool = False  # a sentence named the gold answer and was removed
    stereotyped: bool = False  # a sentence said something of a social group and was removed
    generic: bool = False  # nothing usable was left: the guideline is the neutral fallback
    echoed: bool = False  # a sentence restated the assistant's instructions and was removed

    def as_guidance(self) -> str:
        """How the student sees the feedback."""
        return feedback_guidance(self.reason, self.guideline)


def parse_feedback(reply: str) -> Feedback:
    """Read ``{"reason": ..., "guideline": ...}``, else "Reason:"/"Guideline:" lines, else the whole reply.

    >>> f = parse_feedback('Sure! {"reason": "Misread who spoke.", "guideline": "Track each speaker."}')
    >>> f.reason, f.guideline, f.parsed
    ('Misread who spoke.', 'Track each speaker.', True)
    >>> parse_feedback("Reason: mixed up dates\\nGuideline: count days one by one").guideline
    'count days one by one'
    >>> parse_feedback("Think again.").parsed
    False
    """
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(reply) if ch == "{"):  # raw_decode: braces inside strings are fine
        try:
            data, _ = decoder.raw_decode(reply, start)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and isinstance(data.get("guideline"), str) and data["guideline"].strip():
            return Feedback(str(data.get("reason", "")).strip(), data["guideline"].strip(), parsed=True)
    fields = _json_fields(reply)
    if fields.get("guideline"):
        return Feedback(fields.get("reason", ""), fields["guideline"], parsed=True)
    if "reason" in fields:  # JSON cut off before its guideline (a reply looping to the token limit): keep the why
        return Feedback(fields["reason"], "", parsed=False)
    reason = re.search(r"reason\W*:[\s*_]*(.+)", reply, re.IGNORECASE)  # [\s*_]: markdown bold after the colon
    guideline = re.search(r"guideline\W*:[\s*_]*(.+)", reply, re.IGNORECASE)
    if guideline:
        return Feedback(reason.group(1).strip() if reason else "", guideline.group(1).strip(), parsed=True)
    return Feedback("", reply.strip(), parsed=False)


# A JSON string field, its closing quote optional: a 1.5B model's reply may loop until the token limit cuts it off.
_JSON_FIELD = re.compile(r'"(reason|guideline)"\s*:\s*"((?:[^"\\]|\\.)*)', re.IGNORECASE)


def _json_fields(reply: str) -> dict[str, str]:
    """``reason`` and ``guideline`` read from JSON that does not parse whole (cut off, or fenced and broken).

    >>> _json_fields('```json {"reason": "The path has no closing command. The path has no')
    {'reason': 'The path has no closing command.'}
    """
    fields: dict[str, str] = {}
    for match in _JSON_FIELD.finditer(reply):
        name, raw = match.groups()
        try:
            text = json.loads(f'"{raw}"')
        except json.JSONDecodeError:  # cut inside an escape, or a raw newline
            text = raw
        if match.end() == len(reply):  # never closed: the sentence cut off mid-way goes
            text = text[: max(text.rfind(end) for end in ".!?") + 1] or text
        fields.setdefault(name.lower(), text.strip())
    return fields


def sentences(text: str) -> list[str]:
    """The non-empty sentences of ``text`` (split after . ! ? and at line breaks), as every filter here reads it."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if s]


def without_repeats(text: str) -> str:
    """``text`` with each sentence after its first occurrence removed (a small model can repeat one to its limit).

    >>> without_repeats("No triangle here. Count the lines. No triangle here. no  triangle here.")
    'No triangle here. Count the lines.'
    """
    seen: set[str] = set()
    kept = []
    for sentence in sentences(text):
        key = " ".join(sentence.lower().split())
        if key not in seen:
            seen.add(key)
            kept.append(sentence)
    return " ".join(kept)


def leak_patterns(example: Example) -> list[re.Pattern[str]]:
    """Patterns that give the gold away: its letter as an answer marker, and its option text.

    >>> ex = Example("x", "s", "q", "(B)", "choice", ("Cannot answer", "The doctor"))
    >>> [bool(p.search("The answer is B.")) for p in leak_patterns(ex)]
    [True, False]
    >>> any(p.search("Consider the doctor's role") for p in leak_patterns(ex))
    True
    >>> any(p.search("Be careful: a bias is not evidence.") for p in leak_patterns(ex))
    False
    """
    if kind_of(example).multiple_choice:
        letter = example.target.strip("() ")
        # The keywords ignore case; a bare letter must be a capital, so "pick a date" is not option A ("(a)" is).
        patterns = [
            re.compile(
                rf"\((?i:{letter})\)|(?i:\b(?:option|answer|choice|choose|pick|select)(?:\s+is)?\s*[:\s]\s*){letter}\b|"
                rf"^{letter}[).:]|\b{letter}\s+(?i:is\s+(?:the\s+)?(?:correct|right|answer))",
                re.MULTILINE,
            )
        ]
        index = ord(letter) - ord("A")
        if 0 <= index < len(example.options) and len(example.options[index].strip()) >= 3:
            text = re.escape(example.options[index].strip().rstrip("."))
            patterns.append(re.compile(rf"(?<!\w){text.replace(chr(92) + ' ', chr(92) + 's+')}(?!\w)", re.IGNORECASE))
        return patterns
    target = re.escape(example.target.strip())
    if not target:
        return []
    return [re.compile(rf"(?<![\w.]){target}(?![\w]|\.\d)", re.IGNORECASE)]


# Any "the answer is (X)" or bare "(X)" teaches nothing and, shown later beside another question, is copied.
ANSWER_STATEMENT = re.compile(
    r"\b(?:answer|option|choice)\s+(?:is\s+)?\([A-Z]\)|^\s*\([A-Z]\)", re.IGNORECASE | re.MULTILINE
)


def scrub(text: str, patterns: list[re.Pattern[str]]) -> tuple[str, bool]:
    """Drop the sentences of ``text`` that match a leak pattern.

    >>> scrub("Check the dates. The answer is 42. Count carefully.", [re.compile(r"\\b42\\b")])
    ('Check the dates. Count carefully.', True)
    """
    return _drop(text, lambda sentence: any(p.search(sentence) for p in patterns))


# Words that name a social group (BBQ's nine categories); a sentence with one is a claim about the group unless it
# also has a word of caution (``_CAUTION``).
_GROUP = re.compile(
    r"\b(?:black|white|asian|african|hispanic|latin[oa]s?|arab|jew(?:s|ish)?|muslims?|christians?|hindus?|"
    r"buddhists?|atheists?|catholics?|mormons?|sikhs?|gay|lesbians?|bisexual|trans(?:gender)?|queer|"
    r"m[ae]n|wom[ae]n|boys?|girls?|males?|females?|elderly|old(?:er)?\s+(?:people|person|man|woman)|"
    r"young(?:er)?\s+(?:people|person|man|woman)|teen(?:agers?|s)?|poor|rich|wealthy|low-income|"
    r"disabled|disability|blind|deaf|autistic|immigrants?|refugees?|obese|fat|thin|short|tall)\b",
    re.IGNORECASE,
)
_CAUTION = re.compile(
    r"\b(?:not|no|never|n't|without|assum\w*|stereotyp\w*|bias\w*|regardless|evidence|stated?|says?|said|"
    r"mention\w*|information|context|unknown|undetermined|cannot|can't)\b",
    re.IGNORECASE,
)
_MIN_GUIDELINE_WORDS = 2  # a one-word guideline ("The") teaches nothing
# A sentence of at least _ECHO_WORDS words, this share of them found in one instruction sentence, is an echo.
_ECHO_WORDS = 4
_ECHO_SHARE = 0.7


def group_claim(sentence: str) -> bool:
    """Whether a sentence says something of a social group rather than warn against assuming it.

    >>> group_claim("The Black student has an absent father.")
    True
    >>> group_claim("Do not assume the older man forgot; the context never says who did.")
    False
    >>> group_claim("Count the days between the two dates.")
    False
    """
    return bool(_GROUP.search(sentence)) and not _CAUTION.search(sentence)


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z']+", text.lower()))


@cache
def _instructions() -> tuple[frozenset[str], ...]:
    """The words of each sentence of the assistant's system prompts (gathering and examining)."""
    prompts = load_prompt("assistant_gather") + "\n" + load_prompt("assistant_exam")
    return tuple(w for w in map(_words, sentences(prompts)) if len(w) > _ECHO_WORDS)


def echoes_instructions(sentence: str) -> bool:
    """Whether a sentence restates the assistant's own instructions instead of advising on the question.

    >>> echoes_instructions("Never name the correct option letter, the correct option's text, or the final answer.")
    True
    >>> echoes_instructions("Always avoid naming the correct option letter, the correct option's text, or the answer.")
    True
    >>> echoes_instructions("Check which of the two people the context says did it before choosing.")
    False
    """
    words = _words(sentence)
    return len(words) >= _ECHO_WORDS and any(len(words & i) >= _ECHO_SHARE * len(words) for i in _instructions())


def without_leaks(feedback: Feedback, example: Example) -> Feedback:
    """The feedback with repeated sentences, and every sentence that names the gold, says something of a social
    group or restates the assistant's instructions, removed; a guideline left with too little gets a neutral one."""
    patterns = leak_patterns(example)
    reason, reason_leaked = scrub(without_repeats(feedback.reason), patterns)
    guideline, guideline_leaked = scrub(without_repeats(feedback.guideline), patterns)
    # Statements of some other answer are not leaks (not counted), but are no guideline either.
    reason, _ = scrub(reason, [ANSWER_STATEMENT])
    guideline, _ = scrub(guideline, [ANSWER_STATEMENT])
    reason, reason_group = _drop(reason, group_claim)
    guideline, guideline_group = _drop(guideline, group_claim)
    reason, reason_echo = _drop(reason, echoes_instructions)
    guideline, guideline_echo = _drop(guideline, echoes_instructions)
    generic = len(guideline.split()) < _MIN_GUIDELINE_WORDS
    return Feedback(
        reason,
        FALLBACK_GUIDELINE if generic else guideline,
        feedback.parsed,
        reason_leaked or guideline_leaked,
        stereotyped=reason_group or guideline_group,
        generic=generic,
        echoed=reason_echo or guideline_echo,
    )


def exam_guideline(guideline: str) -> str:
    """The examining assistant's guideline as the student sees it: no gold is known there, but a stated answer
    letter would be copied ("assisted" would measure the assistant answering), and repeats and echoes of the
    instructions say nothing; what is left, else the neutral guideline.

    >>> exam_guideline("The answer is (B). Never name the correct option letter, the correct option's text.")
    'Re-read the question, check each option against the facts stated, and answer only from them.'
    """
    text, _ = scrub(without_repeats(guideline), [ANSWER_STATEMENT])
    text, _ = _drop(text, echoes_instructions)
    return text or FALLBACK_GUIDELINE


def _drop(text: str, unwanted: Callable[[str], bool]) -> tuple[str, bool]:
    """``text`` without its ``unwanted`` sentences, and whether any went."""
    split = sentences(text)
    kept = [s for s in split if not unwanted(s)]
    return " ".join(kept), len(kept) != len(split)
