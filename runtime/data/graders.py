"""Pull the answer out of a model's free-text reply; each answer kind (``runtime.data.kinds``) grades with these.

Small models answer in many shapes ("The answer is (C) because...", "b)", "**B**", the option's text, "#### 1,234",
"$5.00", "Invalid."). The extractors below accept the common ones and refuse to guess when a reply is ambiguous:
a reply with no clear answer gets the verdict ``no_answer``, counted apart from ``wrong``.

Code items are graded by running them: the reply's code (:func:`extract_code`) after the item's prefix
(:func:`program`), against its tests, in the sandbox (``runtime.data.sandbox``), the tests in one process and the
code in another.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from string import ascii_uppercase
from typing import TYPE_CHECKING, Literal

from runtime.data import sandbox

if TYPE_CHECKING:
    from runtime.data.tasks import Example

Verdict = Literal["correct", "wrong", "no_answer"]


@dataclass(frozen=True)
class Grade:
    """A reply's verdict; ``no_answer`` (nothing extractable) is counted apart from ``wrong``."""

    verdict: Verdict
    predicted: str | None  # the normalised extracted answer: "(B)", "18", "valid", code; None when none was found
    error: str | None = None  # code items that failed: why (first line), then the program's stderr tail


# "the answer is", "Answer:", "final answer =", "the correct option is", "the answer to this question is"
_STATEMENT = re.compile(
    r"(?:\banswer(?:\s+to\s+(?:this|the)\s+question)?|\b(?:correct|right|best|final)\s+(?:option|choice))"
    r"(?:[ \t]*(?:is|would\s+be|will\s+be|should\s+be|must\s+be)[ \t]*:?|[ \t]*[:=])[ \t]*\n?[ \t]*"
    r"(?:(?:option|choice)[ \t]+)?",
    re.IGNORECASE,
)
_NUMBER = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
_NUMBER_STATEMENT = re.compile(r"\banswer\b[^\d\n-]{0,20}?(" + _NUMBER + ")", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_TEXT_STATEMENT = re.compile(r"\banswer\b[ \t]*(?:is[ \t]*:?|:)[ \t]*(.*)", re.IGNORECASE)
# A leading letter counts when it is a marker, not an article: "(B)", "B)", "B.", "B:", "B - ...", or "B" alone.
_LEAD_LETTER = re.compile(r"(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])(?=\)|[.:,](?!\w)|[ \t]*(?:\n|$)|\s+[-–—]\s))")
# After an answer statement "A" and "I" may be words ("Answer: A person who..."); other capitals are letters.
_STATED_LETTER = re.compile(
    r"(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?=[ \t]*(?:\n|$)|[).:,;!?]|\s+[-–—(]|\s+(?:because|since)\b)"
    r"|([B-HJ-Z])(?![\w'’])|([a-z])(?=\)|[.:]?[ \t]*(?:\n|$)))"
)
_LETTER_IS_CORRECT = re.compile(r"(?<![\w'’])[(\[]?([A-Z])[)\]]?\s+is\s+(?:the\s+)?(?:correct|right|best)\b")
_ALTERNATIVE = re.compile(r"\s*(?:,|/|\bor\b|\band\b)\s*[(\[]?[A-Za-z](?!\w)")
# A fenced block: ``` or ~~~, an optional language tag, the code, and the closing fence (or the reply's end).
_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.DOTALL | re.MULTILINE)
_CODE_TAGS = ("", "python", "py", "python3")
_MENTIONED_LETTER = re.compile(r"(?<!not )(?:(?<!\w)\(([A-Za-z])\)|\b(?i:option|choice)\s+\(?([A-Z])\b)")
_LABEL_PAIRS = {
    "yes": ("yes", "no"),
    "no": ("yes", "no"),
    "true": ("true", "false"),
    "false": ("true", "false"),
    "valid": ("valid", "invalid"),
    "invalid": ("valid", "invalid"),
}


def extract_choice(reply: str, options: Sequence[str]) -> str | None:
    """The option letter a reply chose, as ``"(B)"``, or None when there is none or it is ambiguous.

    In order: an answer statement ("the answer is (B)", "B is correct"; the last one wins), a leading letter
    marker ("(B)", "B)", "B." but not the article in "A person..."), the one letter mentioned as "(C)" or
    "option C", then the one option whose text the reply contains (the longest, when one text holds another).
    Only letters of the given options count; with no options any capital letter counts and texts are not matched.

    >>> opts = ["Cannot answer", "The twenty-something", "The older adult"]
    >>> extract_choice("The answer is (C) because the older adult said so.", opts)
    '(C)'
    >>> extract_choice("b) The twenty-something", opts)
    '(B)'
    >>> extract_choice("A person who is older is lazier.", opts) is None
    True
    >>> extract_choice("I think it cannot answer.", opts)
    '(A)'
    >>> extract_choice("(A) or (B), hard to say.", opts) is None
    True
    """
    valid = ascii_uppercase[: len(options)] or ascii_uppercase
    text = _clean(reply)
    statements = list(_STATEMENT.finditer(text))
    stated = [(m.start(), _letter(_STATED_LETTER.match(text, m.end()), valid)) for m in statements]
    stated += [(m.start(), _letter(m, valid)) for m in _LETTER_IS_CORRECT.finditer(text)]
    stated = [(at, letter) for at, letter in stated if letter]
    if stated:
        return f"({max(stated)[1]})"
    lead = re.sub(r"^[\s\"'>#-]*(?:(?:option|choice)\s+)?", "", text, flags=re.IGNORECASE)
    lead_match = _LEAD_LETTER.match(lead)
    letter = _letter(lead_match, valid)
    if lead_match and letter and not _ALTERNATIVE.match(lead, lead_match.end()):  # "(A) or (B)" chooses nothing
        return f"({letter})"
    mentioned = {(a or b).upper() for a, b in _MENTIONED_LETTER.findall(text)} & set(valid)
    if len(mentioned) == 1:
        return f"({mentioned.pop()})"
    segments = [_rest_of_line(text, statements[-1].end()), text] if statements else [text]
    for segment in segments:
        index = _option_in_text(segment, options)
        if index is not None:
            return f"({ascii_uppercase[index]})"
    return None


def extract_number(reply: str) -> str | None:
    """The final number of a reply, normalised ("1,234.50" -> "1234.5", "$18.00" -> "18"), or None.

    In order: the last "#### N", the last "the answer is N" / "answer: N", the last number in the text.

    >>> extract_number("She has 3 + 4 = 7 eggs.\\n#### 1,234")
    '1234'
    >>> extract_number("The answer is $5.00.")
    '5'
    >>> extract_number("16 - 3 - 4 = 9, so she sells 9 eggs for 18.")
    '18'
    >>> extract_number("It drops to -3 degrees.")
    '-3'
    >>> extract_number("I don't know.") is None
    True
    """
    text = _clean(reply)
    for found in (_HASHES.findall(text), _NUMBER_STATEMENT.findall(text), _NUMBER_RE.findall(text)):
        if found:
            return _normalise_number(found[-1])
    return None


def extract_text(reply: str) -> str | None:
    """A free-text answer: the text after the last "answer is"/"Answer:", else the first line; normalised.

    Normalised means stripped of whitespace, quotes, markdown and trailing sentence punctuation, and lowercased;
    brackets stay (Dyck-language answers are made of them).

    >>> extract_text("**Answer:** apple banana cherry.")
    'apple banana cherry'
    >>> extract_text("] ] >\\nThe sequence closes all brackets.")
    '] ] >'
    >>> extract_text("   ") is None
    True
    """
    text = _clean(reply)
    lines = [line for line in text.splitlines() if line.strip()]
    statements = list(_TEXT_STATEMENT.finditer(text))
    if statements:
        answer = normalise_text(_rest_of_line(text, statements[-1].start(1)))
        if answer:
            return answer
    return normalise_text(lines[0]) if lines else None


def extract_code(reply: str, entry_point: str | None = None) -> str | None:
    """The program in a reply: a fenced block (the one defining ``entry_point`` first, else the first Python or
    untagged one), or the whole reply when it has no fence; None when that is empty.

    Indentation is kept, so a reply that continues a function's body stays inside it.

    >>> extract_code("Here it is:\\n```python\\ndef f(x):\\n    return x\\n```\\nUse it well.")
    'def f(x):\\n    return x'
    >>> extract_code("```\\nprint(f(1))\\n```\\n```python\\ndef f(x):\\n    return x\\n```", "f")
    'def f(x):\\n    return x'
    >>> extract_code("    return sorted(xs)\\n")
    '    return sorted(xs)'
    >>> extract_code("```python\\ndef g():\\n    pass")  # cut off before the closing fence
    'def g():\\n    pass'
    >>> extract_code("  ") is None
    True
    """
    blocks = [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(reply)]
    if blocks:
        defines = re.compile(rf"\b(?:def|class)\s+{re.escape(entry_point)}\b") if entry_point else None
        defining = [code for _, code in blocks if defines and defines.search(code)]
        python = [code for tag, code in blocks if tag in _CODE_TAGS]
        code = (defining or python or [blocks[0][1]])[0]
    else:
        code = reply
    code = code.rstrip()
    code = re.sub(r"\A(?:[ \t]*\n)+", "", code)  # blank leading lines, keeping the first line's indentation
    return code or None


def program(example: Example, code: str) -> sandbox.Program:
    """What a code item runs: its prefix (HumanEval's prompt) and the code in the program's process, its tests in
    the judge's (``runtime.data.judge``)."""
    prefix = example.metadata.get("prefix", "")
    return sandbox.Program(f"{prefix}{code}\n", example.metadata["tests"], prefix, example.metadata["entry_point"])


def extract_text_for(reply: str, target: str) -> str | None:
    """A free-text answer read for its gold: when the gold is yes/no, true/false or valid/invalid (BBH's binary
    tasks), the label of the reply's answer statement or first word, so "Invalid, because..." is "invalid" and never
    "valid"; else :func:`extract_text`.

    >>> extract_text_for("Invalid, because the premise is false.", "valid")
    'invalid'
    >>> extract_text_for("The answer is: dog.", "cat")
    'dog'
    """
    labels = _LABEL_PAIRS.get(normalise_text(target))
    return _extract_label(reply, labels) if labels else extract_text(reply)


def normalise_text(text: str) -> str:
    """Text as free-text answers are compared: whitespace collapsed, quotes, markdown and trailing sentence
    punctuation stripped, lowercased.

    >>> normalise_text(' "Apple  Pie." ')
    'apple pie'
    """
    text = _collapse(text).strip(" \t\"'`*“”‘’")
    return text.rstrip(".!?,;:").strip(" \t\"'`*“”‘’").lower()


def _extract_label(reply: str, labels: tuple[str, str]) -> str | None:
    """A binary label from the last answer statement's first word, else from the reply's first word."""
    text = _clean(reply)
    statements = list(_TEXT_STATEMENT.finditer(text))
    candidates = [text[statements[-1].start(1) :]] if statements else []
    for candidate in [*candidates, text]:
        m = re.match(r"[\W_]*([A-Za-z]+)", candidate)
        if m and m.group(1).lower() in labels:
            return m.group(1).lower()
    return None


def _clean(reply: str) -> str:
    """Drop markdown emphasis and code marks; turn ``\\boxed{X}`` into an answer statement."""
    return re.sub(r"[*`]", "", _BOXED.sub(r"answer: \1", reply)).strip()


def _letter(match: re.Match[str] | None, valid: str) -> str | None:
    if match is None:
        return None
    letter = next(g for g in match.groups() if g).upper()
    return letter if letter in valid else None


def _rest_of_line(text: str, start: int) -> str:
    """The text from ``start`` to the end of its line, or the next non-empty line when that is blank."""
    lines = [line for line in text[start:].splitlines() if line.strip()]
    return lines[0] if lines else ""


def _option_in_text(text: str, options: Sequence[str]) -> int | None:
    """Index of the one option whose text appears in ``text``; an option inside a longer matched one drops out."""
    low = _collapse(text.lower())
    texts = [_collapse(o.lower()).rstrip(".") for o in options]
    hits = [i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", low)]
    hits = [i for i in hits if not any(texts[i] != texts[j] and texts[i] in texts[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def _normalise_number(number: str) -> str:
    value = Decimal(number.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _collapse(text: str) -> str:
    return " ".join(text.split())
