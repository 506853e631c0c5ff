"""LEMA's corrector: given a wrong reasoning path, name its first wrong step, say why, and correct it.

The wrong path is split into numbered steps ("Step 1: ..."); the corrector, who is told the gold answer, replies
in the LEMA paper's format::

    Incorrect Step: Step 2.
    Explanation: <why step 2 is wrong>
    Correct Solution:
    Step 2: <the corrected step>
    ...
    The answer is 55.

The reply is read strictly (:func:`parse_correction`) and a correction is kept only when its corrected solution's
final answer grades correct against the gold (:func:`review`): a corrector that writes a fluent but wrong fix
teaches the student a new mistake.

Code items (MBPP) are corrected the same way with the program's lines as its steps; the corrected solution is the
whole corrected function in a code block (a program cannot run from its wrong line on), kept only when it passes
the item's tests in the sandbox.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from autogen_agentchat.agents import BaseChatAgent
from autogen_agentchat.base import Response
from autogen_agentchat.messages import BaseChatMessage, StructuredMessage
from autogen_core import CancellationToken
from autogen_core.models import AssistantMessage, ChatCompletionClient, LLMMessage, SystemMessage, UserMessage
from pydantic import BaseModel, ConfigDict

from agents.prompts import load_prompt
from runtime.data.graders import extract_code
from runtime.data.kinds import grade, grade_async, kind_of
from runtime.data.tasks import Example
from runtime.models.backend import Message

CORRECTOR = "corrector"
KEPT = "kept"
WRONG_FINAL_ANSWER = "wrong final answer"  # parsed, but the corrected solution does not reach the gold
# Right, but only stated: no computation in the solution gives the number ("Step 1: The answer is 110."). A 1.5B
# corrector wrote 3 of its 4 right GSM8K corrections so, and they teach the answer, not the way to it.
UNWORKED = "answer not worked out"

# Labels start a line, or follow a sentence's end on the same line ("... Step 2. Explanation: ..."); markdown
# around them ("**Incorrect Step:**", "### Explanation:") is allowed, the colon is not optional.
_LABEL = r"(?:^|(?<=[.!?])[ \t]+)[ \t>#*_-]*(?:{})[ \t]*[*_]*[ \t]*:[ \t]*[*_]*[ \t]*"
_INCORRECT_STEP = re.compile(_LABEL.format(r"incorrect[ \t]+step"), re.IGNORECASE | re.MULTILINE)
_EXPLANATION = re.compile(_LABEL.format(r"explanation"), re.IGNORECASE | re.MULTILINE)
_CORRECT_SOLUTION = re.compile(_LABEL.format(r"correct(?:ed)?[ \t]+solution"), re.IGNORECASE | re.MULTILINE)
_STEP_NUMBER = re.compile(r"(?:step[ \t]*)?#?(\d+)(?![\d.,]\d|\w)", re.IGNORECASE)
_FINAL_ANSWER = re.compile(
    r"\bthe[ \t]+(?:final[ \t]+)?answer[ \t]+is\b[ \t]*:?[ \t]*(?P<answer>[^\n]*?)[ \t]*(?:\.(?=\s|$)|$)",
    re.IGNORECASE | re.MULTILINE,
)
# Sentence ends: punctuation, space, then what starts a sentence; titles like "Mr." end nothing.
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMs\.)(?<!\bDr\.)(?<!\bSt\.)\s+(?=[A-Z$(\d])")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")  # what a computation gives: "= 24", "= $10.50"
_LIST_MARKER = re.compile(r"^\s*(?:step[ \t]*\d+[ \t]*[:.)-]|\d+[.)](?=\s)|[-*•](?=\s))\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Correction:
    """One parsed correction: the first wrong step (1-based), why it is wrong, and the corrected solution."""

    step: int
    explanation: str
    solution: str  # from the corrected step on, ending with "The answer is X."
    answer: str  # X, as written

    def text(self) -> str:
        """The correction in the LEMA paper's format, without whatever chatter surrounded it."""
        return f"Incorrect Step: Step {self.step}.\nExplanation: {self.explanation}\nCorrect Solution:\n{self.solution}"


class ParseResult(NamedTuple):
    correction: Correction | None
    reason: str  # why the reply was rejected; "" when it parsed


def parse_correction(text: str, n_steps: int | None = None, code: bool = False) -> ParseResult:
    """Read a corrector's reply; reject it, with a reason, unless every part of the format is there.

    ``n_steps`` is the number of steps the wrong path had: the incorrect step must be one of them.
    Chatter before the first label and after the final answer is dropped, and so is a second correction.
    With ``code``, the corrected solution is a program (its code block), with no "The answer is" line.

    >>> reply = '''Sure, here it is.
    ... **Incorrect Step:** Step 2.
    ... **Explanation:** Monday's 15 pages are missing from the total.
    ... **Correct Solution:**
    ... Step 2: In total he has read 15 + 30 = 45 pages.
    ... Step 3: He still has to read 100 - 45 = 55 pages.
    ... The answer is 55.
    ... Hope this helps!'''
    >>> correction, reason = parse_correction(reply, n_steps=4)
    >>> correction.step, correction.answer, reason
    (2, '55', '')
    >>> print(correction.text())
    Incorrect Step: Step 2.
    Explanation: Monday's 15 pages are missing from the total.
    Correct Solution:
    Step 2: In total he has read 15 + 30 = 45 pages.
    Step 3: He still has to read 100 - 45 = 55 pages.
    The answer is 55.
    >>> parse_correction(reply, n_steps=1).reason
    'step number out of range'
    >>> parse_correction("Incorrect Step: Step N.\\nExplanation: x\\nCorrect Solution: y").reason
    'step is not a number'
    >>> parse_correction("The second step is wrong; the answer is 55.").reason
    'no Incorrect Step'
    """
    step_label = _INCORRECT_STEP.search(text)
    if step_label is None:
        return ParseResult(None, "no Incorrect Step")
    solution_label = _CORRECT_SOLUTION.search(text, step_label.end())
    explanation_label = _EXPLANATION.search(
        text, step_label.end(), solution_label.start() if solution_label else len(text)
    )
    value_end = next((m.start() for m in (explanation_label, solution_label) if m), len(text))
    value = text[step_label.end() : value_end].strip().strip("*_").strip()
    number = _STEP_NUMBER.match(value)
    if number is None:
        return ParseResult(None, "step is not a number")
    step = int(number.group(1))
    if step < 1 or (n_steps is not None and step > n_steps):
        return ParseResult(None, "step number out of range")
    if explanation_label is None:
        return ParseResult(None, "no Explanation")
    explanation = text[explanation_label.end() : solution_label.start() if solution_label else len(text)].strip()
    if not explanation:
        return ParseResult(None, "no Explanation")
    if solution_label is None:
        return ParseResult(None, "no Correct Solution")
    after = [m.start() for m in (_INCORRECT_STEP.search(text, solution_label.end()),) if m]
    body = text[solution_label.end() : after[0] if after else len(text)].strip()
    if not body:
        return ParseResult(None, "no Correct Solution")
    if code:
        program = extract_code(body)
        if program is None:
            return ParseResult(None, "no code in the Correct Solution")
        return ParseResult(Correction(step, explanation, f"```python\n{program}\n```", ""), "")
    for final in _FINAL_ANSWER.finditer(body):
        answer = final.group("answer").strip(" \t*_").rstrip(".").strip()
        if answer:
            return ParseResult(Correction(step, explanation, body[: final.end()].strip(), answer), "")
    return ParseResult(None, "no final answer")


@dataclass(frozen=True)
class Review:
    """What became of one corrector reply: ``status`` is ``kept``, ``wrong final answer`` or a parse failure."""

    status: str
    correction: Correction | None  # also set when the answer was wrong, so reports can show it


class CorrectorReply(BaseModel):
    """The corrector's message: its raw reply, what became of it, and how many steps the path was split into."""

    model_config = ConfigDict(frozen=True)

    text: str
    review: Review
    steps: int


def review(example: Example, reply: str, n_steps: int) -> Review:
    """Parse a corrector's reply and grade its corrected solution against the example's gold (code: run it)."""
    correction, reason = parse_correction(reply, n_steps, code=kind_of(example).code)
    if correction is None:
        return Review(reason, None)
    return _reviewed(example, correction, grade(example, correction.solution).verdict)


async def review_async(example: Example, reply: str, n_steps: int) -> Review:
    """:func:`review`, with a code item's program run off the event loop."""
    correction, reason = parse_correction(reply, n_steps, code=kind_of(example).code)
    if correction is None:
        return Review(reason, None)
    return _reviewed(example, correction, (await grade_async(example, correction.solution)).verdict)


def _reviewed(example: Example, correction: Correction, verdict: str) -> Review:
    if verdict != "correct":
        return Review(WRONG_FINAL_ANSWER, correction)
    if kind_of(example).name == "number" and not worked_out(correction.solution, example.target):
        return Review(UNWORKED, correction)
    return Review(KEPT, correction)


def worked_out(solution: str, gold: str) -> bool:
    """Whether a computation in ``solution`` gives the number ``gold`` ("= 24"), besides its "The answer is" line.

    >>> worked_out("Step 1: He buys 4 * 6 = 24 pens.\\nThe answer is 24.", "24")
    True
    >>> worked_out("Step 1: The answer is 110.\\nStep 2: This is a geometric progression.", "110")
    False
    >>> worked_out("Step 5: So, she earned $12 * (5/6) = $10.\\nThe answer is 10.", "10")
    True
    """
    work = _FINAL_ANSWER.sub("", solution)
    return any(float(m.group(1).replace(",", "")) == float(gold) for m in _RESULT.finditer(work))


def split_steps(path: str) -> list[str]:
    """A reasoning path as steps: one per line, and lines split into sentences; existing numbering dropped.

    >>> split_steps("Natalia sold 48/2 = 24 clips in May. She sold 48 + 24 = 72 clips.\\n\\nThe answer is 72.")
    ['Natalia sold 48/2 = 24 clips in May.', 'She sold 48 + 24 = 72 clips.', 'The answer is 72.']
    >>> split_steps("Step 1: Mr. Lee pays $2.50 each.\\n2. Then 4 * 2.50 = 10.")
    ['Mr. Lee pays $2.50 each.', 'Then 4 * 2.50 = 10.']
    """
    steps = []
    for line in path.splitlines():
        for sentence in _SENTENCE_END.split(_LIST_MARKER.sub("", line)):
            sentence = _LIST_MARKER.sub("", sentence).strip()
            if re.search(r"\w", sentence):
                steps.append(sentence)
    return steps


def path_steps(example: Example, path: str) -> list[str]:
    """A path's steps: :func:`split_steps`, or for a code item the non-blank lines of its code, indentation kept.

    >>> code = Example("c/1", "c", "q", "def f(): ...", "code")
    >>> path_steps(code, "```python\\ndef f(x):\\n\\n    return x\\n```")
    ['def f(x):', '    return x']
    """
    if not kind_of(example).code:
        return split_steps(path)
    return [line for line in (extract_code(path) or "").splitlines() if line.strip()]


def format_steps(steps: Sequence[str]) -> str:
    """Numbered steps, one a line.

    >>> print(format_steps(["Add 2 and 3.", "The answer is 5."]))
    Step 1: Add 2 and 3.
    Step 2: The answer is 5.
    """
    return "\n".join(f"Step {i}: {step}" for i, step in enumerate(steps, 1))


def gold_answer(example: Example) -> str:
    """The gold as the corrector reads it: a choice item's letter with its option text."""
    return kind_of(example).gold_text(example)


def worked_examples(name: str = "corrector_examples") -> list[tuple[str, str]]:
    """The corrector's worked examples as (user, assistant) turns, from ``prompts/corrector_examples.txt``.

    Shown as earlier turns of the chat rather than inside the instructions, so the model's own turn starts the
    way the examples' replies do: "Incorrect Step: ...".
    """
    pairs = []
    for block in load_prompt(name).split("\n---\n"):
        user, _, reply = block.strip().partition("\nIncorrect Step:")
        pairs.append((user.strip(), "Incorrect Step:" + reply))
    return pairs


def corrector_messages(example: Example, steps: Sequence[str]) -> list[Message]:
    """The chat the corrector answers: instructions, the worked examples, then the problem, gold and steps."""
    code = "_code" if kind_of(example).code else ""
    chat: list[Message] = [{"role": "system", "content": load_prompt(f"corrector{code}")}]
    for user, reply in worked_examples(f"corrector{code}_examples"):
        chat += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    # A code item's gold is passing its tests, which the task shows; a reference solution would only be copied.
    user = load_prompt(f"corrector{code}_user").format(
        question=example.input, gold=gold_answer(example), steps=format_steps(steps)
    )
    return [*chat, {"role": "user", "content": user}]


def correction_prompt(question: str, steps: Sequence[str], code: bool = False) -> str:
    """The user turn of a correction-data row: the question and the wrong steps, never the gold."""
    return load_prompt("corrector_train_code" if code else "corrector_train").format(
        question=question, steps=format_steps(steps)
    )


class CorrectorAgent(BaseChatAgent):
    """Corrects the reasoning path in the last message it is given, for one example (it knows the gold).

    The reply is a structured message: a :class:`CorrectorReply` with the raw text (what ``to_text`` shows), the
    :class:`Review` and the number of steps the path was split into.
    """

    def __init__(self, example: Example, client: ChatCompletionClient) -> None:
        super().__init__(CORRECTOR, "names the first wrong step of a solution, explains it and corrects it")
        self.example, self.client = example, client

    @property
    def produced_message_types(self) -> Sequence[type[BaseChatMessage]]:
        return (StructuredMessage[CorrectorReply],)

    async def on_messages(self, messages: Sequence[BaseChatMessage], cancellation_token: CancellationToken) -> Response:
        steps = path_steps(self.example, messages[-1].to_text() if messages else "")
        llm: list[LLMMessage] = [_llm_message(m) for m in corrector_messages(self.example, steps)]
        result = await self.client.create(llm, cancellation_token=cancellation_token)
        text = result.content if isinstance(result.content, str) else str(result.content)
        verdict = await review_async(self.example, text, len(steps))
        content = CorrectorReply(text=text, review=verdict, steps=len(steps))
        message = StructuredMessage[CorrectorReply](
            content=content, source=self.name, models_usage=result.usage, format_string="{text}"
        )
        return Response(chat_message=message)

    async def on_reset(self, cancellation_token: CancellationToken) -> None:  # noqa: B027 - keeps no state
        """Nothing to forget: each agent serves one example."""


def _llm_message(message: Message) -> LLMMessage:
    if message["role"] == "system":
        return SystemMessage(content=message["content"])
    if message["role"] == "assistant":
        return AssistantMessage(content=message["content"], source=CORRECTOR)
    return UserMessage(content=message["content"], source="user")
