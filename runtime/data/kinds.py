"""Answer kinds: everything an item's kind of answer decides, one class per kind.

An ``Example`` names its kind with a string (``choice``, ``number``, ``text``, ``code``), which is what run folders
record; code looks the kind up once, ``kind_of(example)``, and asks it rather than branching on the string. A kind
says

- how a gold is read from the data (:meth:`AnswerKind.gold`) and the options from a question (``options_of``);
- which system prompt the student answers under (``student_prompt``, a template in ``agents/prompts``);
- how an answer is pulled out of a reply (``extract``, with the extractors of ``runtime.data.graders``) and graded;
- what a training row's reply is (``gold_reply``), how an instructor's written sample is read (``sample``) and which
  instructor strategies may write its rows (``instructor_strategies``).

A new kind is a subclass and an entry in ``KINDS`` (and its student prompt template); nothing else branches on it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from string import ascii_uppercase
from typing import TYPE_CHECKING

from runtime.data import sandbox
from runtime.data.graders import (
    Grade,
    extract_choice,
    extract_code,
    extract_number,
    extract_text_for,
    normalise_text,
    program,
)
from runtime.errors import DataError

if TYPE_CHECKING:
    from runtime.data.tasks import Example

# The strategies whose rows an instructor writes (training.instruct): the others train on the items themselves.
INSTRUCTOR_STRATEGIES = frozenset({"le", "lec", "augment"})

_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")
_CHOICE_TARGET = re.compile(r"^\(?([A-Za-z])\)?$")
_NUMBER_TARGET = re.compile(r"-?\d+(?:\.\d+)?")
# An instructor's sample writes options inline or one per line: "A. text", "(A) text", "A) text".
_WRITTEN_OPTION = re.compile(r"(?:^|\s)\(?([A-E])[.)]\s+", re.MULTILINE)
# List and bold markers around a written stem, and its own "Options:" heading: "**\n - Who?\n - Options:". A dash is
# a marker only before a space, so a stem that starts with a negative number keeps it.
_STEM_MARKS = re.compile(r"^(?:[\s*]|-(?=\s))+|(?:[\s*]|-(?=\s))*(?:\bOptions\s*:)?[\s*]*$", re.IGNORECASE)
_WRITTEN_LETTER = re.compile(r"^\s*\(?([A-E])\b[).]?")
_WRITTEN_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Sample:
    """One instructor-written training sample: the question as the student will see it, and the reply to learn."""

    question: str  # choice samples carry an "Options:" block of "(A) text" lines, as benchmark items do
    target: str  # "(B)", "18", or text
    response: str  # the reply trained on, ending "The answer is ..." like the student's own format


class AnswerKind:
    """A free-text answer, and what every kind does unless it says otherwise."""

    name = "text"
    student_prompt = "student_text"  # the student's system prompt (agents/prompts/<name>.txt)
    instructor_prompt = "instructor_le_choice"  # the le/lec instructor's system prompt (its choice form, as before)
    sample_shape = ""  # what the instructor's user prompt asks each sample to carry
    instructor_strategies = INSTRUCTOR_STRATEGIES
    multiple_choice = False  # golds are option letters: a letter prior, option shuffling, likelihood scoring
    code = False  # the answer is a program, graded by running it in the sandbox
    closed = False  # a grader's "correct" can be taken at its word (free text is matched too strictly for that)
    jsonl = True  # bring-your-own JSONL rows may have this kind

    def gold(self, target: str, options: Sequence[str], where: str) -> str:
        """The gold as items store it, from the data's target; a ``DataError`` naming ``where`` when it is none."""
        return target

    def options_of(self, question: str) -> tuple[str, ...]:
        """The option texts an item of this kind carries for ``question``."""
        return ()

    def extract(self, reply: str, example: Example) -> str | None:
        """The reply's answer, normalised to compare with the gold; None when it has none."""
        return extract_text_for(reply, example.target)

    def matches(self, predicted: str, example: Example) -> bool:
        return predicted == normalise_text(example.target)

    def grade(self, example: Example, reply: str) -> Grade:
        predicted = self.extract(reply, example)
        if predicted is None:
            return Grade("no_answer", None)
        return Grade("correct" if self.matches(predicted, example) else "wrong", predicted)

    async def grade_async(self, example: Example, reply: str) -> Grade:
        return self.grade(example, reply)

    def solution(self, example: Example) -> str | None:
        """The worked solution when the item has one (GSM8K), ending like the student's: "The answer is N".

        >>> from runtime.data.tasks import Example
        >>> ex = Example("g/0", "gsm8k", "q", "72", "number", (), {"solution": "May: 48/2 = <<48/2=24>>24.\\n#### 72"})
        >>> print(kind_of(ex).solution(ex))
        May: 48/2 = 24.
        The answer is 72.
        """
        solution = example.metadata.get("solution")
        if not solution:
            return None
        body = re.sub(r"<<[^<>]*>>", "", solution.rpartition("####")[0]).strip()
        return f"{body}\nThe answer is {example.target}."

    def gold_reply(self, example: Example, name_option: bool = False) -> str:
        """The reply a training row teaches: the worked solution when there is one, else the gold in the student's
        format (``name_option``: see :class:`Choice`)."""
        return self.solution(example) or f"The answer is {example.target}."

    def gold_text(self, example: Example) -> str:
        """The gold as a person (or a corrector) reads it."""
        return example.target

    def shuffled(self, example: Example, rng: random.Random) -> Example:
        """The item as a training row may show it: its options in a random order, for kinds that have them."""
        return example

    def sample(self, question: str, answer: str, n_options: int) -> tuple[Sample | None, str]:
        """An instructor's sample from its question and answer text, or None and why it was rejected."""
        first_line = answer.splitlines()[0].strip()
        return Sample(question, first_line, f"The answer is {first_line}."), ""


class Text(AnswerKind):
    """Free text, compared after normalising (a yes/no, true/false or valid/invalid gold reads the reply's label)."""


class Choice(AnswerKind):
    """One of lettered options; the gold is written "(B)"."""

    name = "choice"
    student_prompt = "student_choice"
    sample_shape = ", each with its options, the correct letter and why"
    multiple_choice = True
    closed = True

    def gold(self, target: str, options: Sequence[str], where: str) -> str:
        m = _CHOICE_TARGET.match(target.strip())
        if m is None:
            raise DataError(f"{where}: a choice target must be a letter like '(B)', got {target!r}")
        letter = m.group(1).upper()
        if not options:
            raise DataError(
                f"{where}: a choice target ({letter}) needs options, and the input has no '(A) ...' lines "
                "(letters A, B, C, ... in order, after an 'Options:' line); add them, or use --answer-kind text"
            )
        if letter not in ascii_uppercase[: len(options)]:
            raise DataError(f"{where}: target ({letter}) is not one of the {len(options)} options")
        return f"({letter})"

    def options_of(self, question: str) -> tuple[str, ...]:
        return parse_options(question)

    def extract(self, reply: str, example: Example) -> str | None:
        return extract_choice(reply, example.options)

    def matches(self, predicted: str, example: Example) -> bool:
        return predicted == example.target

    def gold_reply(self, example: Example, name_option: bool = False) -> str:
        """With ``name_option`` the reply names the gold option's text before its letter.

        >>> from runtime.data.tasks import Example
        >>> e = Example("q/1", "bbq/Age", "Who?\\nOptions:\\n(A) x\\n(B) Unknown", "(B)", "choice", ("x", "Unknown"))
        >>> CHOICE.gold_reply(e), CHOICE.gold_reply(e, name_option=True)
        ('The answer is (B).', 'Unknown. The answer is (B).')
        """
        if name_option and example.options and not self.solution(example):
            return f"{gold_option(example).rstrip('. ')}. The answer is {example.target}."
        return super().gold_reply(example)

    def gold_text(self, example: Example) -> str:
        return f"{example.target} {gold_option(example)}" if example.options else example.target

    def shuffled(self, example: Example, rng: random.Random) -> Example:
        if not example.options:
            return example
        order = list(range(len(example.options)))
        rng.shuffle(order)
        return reorder_options(example, order)

    def sample(self, question: str, answer: str, n_options: int) -> tuple[Sample | None, str]:
        marks = list(_WRITTEN_OPTION.finditer(question))
        letters = [m.group(1) for m in marks]
        if "A" in letters[1:]:  # the options listed twice (a small model restates them): the first list counts
            cut = letters.index("A", 1)
            question = re.sub(r"\s*Options:\s*$", "", question[: marks[cut].start()])
            marks, letters = marks[:cut], letters[:cut]
        if len(marks) < 2 or letters != list(ascii_uppercase[: len(marks)]):
            return None, "no lettered options"
        if n_options and len(marks) != n_options:
            return None, f"not {n_options} options"
        # The stem without list or bold markers, and without an "Options:" heading of its own (one is added below).
        stem = _STEM_MARKS.sub("", question[: marks[0].start()]).strip()
        options = [
            question[m.end() : (marks[i + 1].start() if i + 1 < len(marks) else len(question))].strip()
            for i, m in enumerate(marks)
        ]
        if not stem or not all(options) or len(set(options)) < len(options):
            return None, "empty or repeated option"
        letter = _WRITTEN_LETTER.match(answer)
        if letter is None or letter.group(1) not in letters:
            return None, "answer is not one of the options"
        target = f"({letter.group(1)})"
        explanation = answer[letter.end() :].strip(" -:.\n")
        body = f"{explanation}. The answer is {target}." if explanation else f"The answer is {target}."
        text = stem + "\nOptions:\n" + "\n".join(f"({ascii_uppercase[i]}) {o}" for i, o in enumerate(options))
        return Sample(text, target, body), ""


class Number(AnswerKind):
    """A number; golds are stored plain ("1234", "-2.5") and compared by value."""

    name = "number"
    student_prompt = "student_number"
    instructor_prompt = "instructor_le_number"
    closed = True

    def gold(self, target: str, options: Sequence[str], where: str) -> str:
        number = target.replace(",", "").removeprefix("$").strip()
        if not _NUMBER_TARGET.fullmatch(number):
            raise DataError(f"{where}: a number target must be a number like 18 or -2.5, got {target!r}")
        return number

    def extract(self, reply: str, example: Example) -> str | None:
        return extract_number(reply)

    def matches(self, predicted: str, example: Example) -> bool:
        gold = extract_number(example.target)
        return gold is not None and Decimal(predicted) == Decimal(gold)

    def sample(self, question: str, answer: str, n_options: int) -> tuple[Sample | None, str]:
        numbers = _WRITTEN_NUMBER.findall(answer.rpartition("answer is")[2] or answer)
        if not numbers:
            return None, "no number in the answer"
        target = numbers[-1].replace(",", "").rstrip(".")
        body = answer if "answer is" in answer.lower() else f"{answer}\nThe answer is {target}."
        return Sample(question, target, body), ""


class Code(AnswerKind):
    """A program: the item's metadata holds its ``prefix``, ``tests`` and ``entry_point`` (``runtime.data.tasks``);
    the target is the canonical solution. Graded by running it against the tests in the sandbox."""

    name = "code"
    student_prompt = "student_code"
    instructor_strategies: frozenset[str] = frozenset()  # its samples would need tests, which instructors don't write
    code = True
    jsonl = False  # a JSONL row has no tests to run

    def extract(self, reply: str, example: Example) -> str | None:
        return extract_code(reply, example.metadata.get("entry_point"))

    def grade(self, example: Example, reply: str) -> Grade:
        code = self.extract(reply, example)
        return _code_grade(code, sandbox.current().run(program(example, code)) if code else None)

    async def grade_async(self, example: Example, reply: str) -> Grade:
        code = self.extract(reply, example)
        return _code_grade(code, await sandbox.current().arun(program(example, code)) if code else None)

    def solution(self, example: Example) -> str | None:
        return f"```python\n{example.target.strip()}\n```"


CHOICE, NUMBER, TEXT, CODE = Choice(), Number(), Text(), Code()
KINDS: dict[str, AnswerKind] = {k.name: k for k in (CHOICE, NUMBER, TEXT, CODE)}


def kind_named(name: str) -> AnswerKind:
    try:
        return KINDS[name]
    except KeyError:
        raise DataError(f"unknown answer kind {name!r}; the kinds are {', '.join(KINDS)}") from None


def kind_of(example: Example) -> AnswerKind:
    """The kind object of an item."""
    return kind_named(example.answer_kind)


def jsonl_kinds() -> list[str]:
    """The kinds a bring-your-own JSONL file may declare (``--answer-kind``)."""
    return [name for name, k in KINDS.items() if k.jsonl]


def grade(example: Example, reply: str) -> Grade:
    """Grade one reply as its kind does: exact option letter, numeric equality, normalised text equality, or
    running the code.

    Targets that are yes/no, true/false or valid/invalid (BBH's binary tasks) are read from the reply's answer
    statement or its first word, so "Invalid, because..." is "invalid" and never "valid". A code item's program
    runs in the sandbox in this thread; async callers use :func:`grade_async`.
    """
    return kind_of(example).grade(example, reply)


async def grade_async(example: Example, reply: str) -> Grade:
    """:func:`grade`, with a code item's program run in the sandbox's worker threads (bounded by the cores)."""
    return await kind_of(example).grade_async(example, reply)


def _code_grade(code: str | None, run: sandbox.Run | None) -> Grade:
    if code is None or run is None:
        return Grade("no_answer", None)
    if run.passed:
        return Grade("correct", code)
    return Grade("wrong", code, run.reason + (f"\n{run.error}" if run.error else ""))


# --- the options of choice items ---


def parse_options(text: str) -> tuple[str, ...]:
    """Option texts from the ``(A) text`` lines after an ``Options:`` line (or anywhere, if there is none).

    Letters must run A, B, C, ... in order; a block that does not is no option block.

    >>> parse_options("Which?\\nOptions:\\n(A) red\\n(B) blue ")
    ('red', 'blue')
    >>> parse_options("Is it?\\nOptions:\\n- Yes\\n- No")
    ()
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "Options:"]
    if starts:
        lines = lines[starts[-1] + 1 :]
    options: list[str] = []
    for line in lines:
        m = _OPTION_LINE.match(line.strip())
        if m is None:
            continue
        if m.group(1) != ascii_uppercase[len(options)]:
            return ()
        options.append(m.group(2).strip())
    return tuple(options)


def gold_option(example: Example) -> str:
    """The text of a choice item's gold option.

    >>> from runtime.data.tasks import Example
    >>> gold_option(Example("q/1", "s", "Who?\\nOptions:\\n(A) x\\n(B) y", "(B)", "choice", ("x", "y")))
    'y'
    """
    return example.options[ascii_uppercase.index(example.target.strip("()"))]


def reorder_options(example: Example, order: Sequence[int]) -> Example:
    """The choice item with its options in ``order`` (indices into the old ones) and its gold relettered to match.

    >>> from runtime.data.tasks import Example
    >>> e = reorder_options(Example("q/1", "s", "Who?\\nOptions:\\n(A) x\\n(B) y", "(B)", "choice", ("x", "y")), [1, 0])
    >>> e.input, e.target, e.options
    ('Who?\\nOptions:\\n(A) y\\n(B) x', '(A)', ('y', 'x'))
    """
    lines = example.input.split("\n")
    start = max((i for i, line in enumerate(lines) if line.strip() == "Options:"), default=-1) + 1
    at = [i for i in range(start, len(lines)) if _OPTION_LINE.match(lines[i].strip())]
    if len(at) != len(example.options) or sorted(order) != list(range(len(at))):
        raise ValueError(f"{example.id}: {len(at)} option lines, {len(example.options)} options, order {order}")
    options = tuple(example.options[j] for j in order)
    for letter, i, text in zip(ascii_uppercase, at, options, strict=False):
        lines[i] = f"({letter}) {text}"
    gold = ascii_uppercase.index(example.target.strip("()"))
    target = f"({ascii_uppercase[list(order).index(gold)]})"
    return replace(example, input="\n".join(lines), target=target, options=options)
