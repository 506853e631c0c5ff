"""LEMA's corrector: the strict parser on what models actually write, the review, step splitting, and the agent.

The agent runs on a scripted backend (tests/helpers.py): every check is exact and takes milliseconds.
"""

from __future__ import annotations

import re

import pytest
from autogen_agentchat.messages import StructuredMessage, TextMessage
from autogen_core import CancellationToken

from agents.prompts import load_prompt
from agents.roles import contents
from runtime.data.tasks import Example
from runtime.models.autogen_client import BackendChatCompletionClient
from tests.helpers import ScriptedBackend
from training.lema.corrector import (
    KEPT,
    UNWORKED,
    WRONG_FINAL_ANSWER,
    Correction,
    CorrectorAgent,
    CorrectorReply,
    Review,
    correction_prompt,
    corrector_messages,
    format_steps,
    gold_answer,
    parse_correction,
    review,
    split_steps,
    worked_examples,
)

BOOK = Example(
    "toy/book",
    "gsm8k",
    "Tom reads 15 pages on Monday and twice as many on Tuesday. His book has 100 pages. How many pages are left?",
    "55",
    "number",
)
WRONG_PATH = (
    "On Tuesday Tom reads 15 * 2 = 30 pages. In total he has read 30 pages.\nSo 100 - 30 = 70 pages are left.\n"
)
WRONG_PATH += "The answer is 70."
GOOD = (
    "Incorrect Step: Step 2.\n"
    "Explanation: The total must include Monday's 15 pages.\n"
    "Correct Solution:\n"
    "Step 2: In total he has read 15 + 30 = 45 pages.\n"
    "Step 3: So 100 - 45 = 55 pages are left.\n"
    "The answer is 55."
)
EXPLANATION = "The total must include Monday's 15 pages."
SOLUTION = (
    "Step 2: In total he has read 15 + 30 = 45 pages.\nStep 3: So 100 - 45 = 55 pages are left.\nThe answer is 55."
)


# ---- parse_correction: well-formed replies in the many shapes models write them ------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(GOOD, id="canonical"),
        pytest.param(
            GOOD.replace("Incorrect Step:", "**Incorrect Step:**")
            .replace("Explanation:", "**Explanation:**")
            .replace("Correct Solution:", "**Correct Solution:**"),
            id="bold-labels",
        ),
        pytest.param(
            GOOD.replace("Incorrect Step:", "**Incorrect Step**:")
            .replace("Explanation:", "**Explanation**:")
            .replace("Correct Solution:", "**Correct Solution**:"),
            id="bold-outside-colon",
        ),
        pytest.param(
            GOOD.replace("Incorrect Step: Step", "incorrect step: step")
            .replace("Explanation:", "explanation:")
            .replace("Correct Solution:", "correct solution:"),
            id="lowercase-labels",
        ),
        pytest.param(
            GOOD.replace("Incorrect Step:", "INCORRECT STEP:").replace("Correct Solution:", "CORRECT SOLUTION:"),
            id="uppercase-labels",
        ),
        pytest.param("Sure! Let me look at this solution carefully.\n\n" + GOOD, id="chatter-before"),
        pytest.param(GOOD + "\n\nI hope this helps! Let me know if you have other questions.", id="chatter-after"),
        pytest.param("Here is my review.\n" + GOOD + " Good luck with your studies!", id="chatter-both"),
        pytest.param(GOOD.replace("Step 2.\nExplanation", "Step 2. Explanation"), id="explanation-same-line"),
        pytest.param("Okay. Incorrect Step: Step 2.\n" + GOOD.split("\n", 1)[1], id="label-after-sentence"),
        pytest.param(GOOD.replace("Step 2.\n", "2\n", 1), id="bare-number"),
        pytest.param(GOOD.replace("Step 2.\n", "Step 2: In total he has read 30 pages.\n", 1), id="quotes-the-step"),
        pytest.param(
            GOOD.replace("Incorrect Step:", "### Incorrect Step:")
            .replace("Explanation:", "### Explanation:")
            .replace("Correct Solution:", "### Correct Solution:"),
            id="markdown-headings",
        ),
        pytest.param(
            GOOD.replace("Incorrect Step:", "- Incorrect Step:")
            .replace("Explanation:", "- Explanation:")
            .replace("Correct Solution:", "- Correct Solution:"),
            id="list-items",
        ),
        pytest.param(
            GOOD + "\n\nIncorrect Step: Step 3.\nExplanation: again\nCorrect Solution:\nThe answer is 1.",
            id="second-correction-dropped",
        ),
    ],
)
def test_parse_well_formed(reply: str) -> None:
    correction, reason = parse_correction(reply, n_steps=4)
    assert reason == ""
    assert correction == Correction(2, EXPLANATION, SOLUTION, "55")


@pytest.mark.parametrize(
    ("reply", "step", "solution", "answer"),
    [
        (
            "Incorrect Step: Step 1.\nExplanation: wrong op.\nCorrected Solution:\nThe final answer is 9.",
            1,
            "The final answer is 9.",
            "9",
        ),
        (
            "Incorrect Step: Step 1\nExplanation: x\nCorrect Solution: 4 * 2.50 = 10. The answer is $10.00.",
            1,
            "4 * 2.50 = 10. The answer is $10.00.",
            "$10.00",
        ),
        (
            "Incorrect Step: Step 3\nExplanation: x\nCorrect Solution:\nStep 3: 1,234.5 - 0.5 = 1,234.\nThe answer is "
            "1,234. That is all.",
            3,
            "Step 3: 1,234.5 - 0.5 = 1,234.\nThe answer is 1,234.",
            "1,234",
        ),
        (
            "Incorrect Step: Step 2\nExplanation: x\nCorrect Solution:\nThe answer is: **42**",
            2,
            "The answer is: **42**",
            "42",
        ),
        (
            "Incorrect Step: Step #4\nExplanation: x\nCorrect Solution:\nthe answer is (B).",
            4,
            "the answer is (B).",
            "(B)",
        ),
    ],
)
def test_parse_solution_and_answer(reply: str, step: int, solution: str, answer: str) -> None:
    correction, reason = parse_correction(reply, n_steps=4)
    assert reason == ""
    assert (correction.step, correction.solution, correction.answer) == (step, solution, answer)


# ---- parse_correction: malformed and partial replies are rejected, each with its reason ------------------------


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        pytest.param("", "no Incorrect Step", id="empty"),
        pytest.param("The second step is wrong. The answer is 55.", "no Incorrect Step", id="prose"),
        pytest.param(GOOD.split("\n", 1)[1], "no Incorrect Step", id="missing-step-label"),
        pytest.param(GOOD.replace("Incorrect Step:", "Incorrect Step"), "no Incorrect Step", id="label-without-colon"),
        pytest.param(GOOD.replace("Incorrect Step:", "The incorrect step:"), "no Incorrect Step", id="mid-sentence"),
        pytest.param(GOOD.replace("Step 2.\n", "Step N.\n", 1), "step is not a number", id="step-N"),
        pytest.param(GOOD.replace("Step 2.\n", "Step two.\n", 1), "step is not a number", id="step-in-words"),
        pytest.param(GOOD.replace("Step 2.\n", "the second one\n", 1), "step is not a number", id="ordinal"),
        pytest.param(
            GOOD.replace("Step 2.\n", "None, the solution is correct.\n", 1), "step is not a number", id="none"
        ),
        pytest.param(GOOD.replace("Step 2.\n", "Step 2.5\n", 1), "step is not a number", id="decimal"),
        pytest.param(GOOD.replace("Step 2.\n", "\n", 1), "step is not a number", id="empty-step"),
        pytest.param(GOOD.replace("Step 2.\n", "Step 0.\n", 1), "step number out of range", id="step-0"),
        pytest.param(GOOD.replace("Step 2.\n", "Step 5.\n", 1), "step number out of range", id="past-last-step"),
        pytest.param(
            GOOD.replace("Explanation: The total must include Monday's 15 pages.\n", ""),
            "no Explanation",
            id="missing-explanation",
        ),
        pytest.param(
            GOOD.replace(" The total must include Monday's 15 pages.", ""), "no Explanation", id="empty-explanation"
        ),
        pytest.param(GOOD.split("Correct Solution:")[0], "no Correct Solution", id="missing-solution"),
        pytest.param(GOOD.replace("Correct Solution:", "Solution:"), "no Correct Solution", id="wrong-label"),
        pytest.param(
            GOOD.split("Correct Solution:")[0] + "Correct Solution:\n   ", "no Correct Solution", id="empty-solution"
        ),
        pytest.param(GOOD.replace("\nThe answer is 55.", ""), "no final answer", id="no-answer-statement"),
        pytest.param(GOOD.replace("The answer is 55.", "#### 55"), "no final answer", id="hashes-only"),
        pytest.param(GOOD.replace("The answer is 55.", "The answer is."), "no final answer", id="empty-answer"),
        pytest.param(GOOD[: GOOD.index("Step 3")], "no final answer", id="truncated-in-solution"),
        pytest.param(GOOD[: GOOD.index("Monday")], "no Correct Solution", id="truncated-in-explanation"),
    ],
)
def test_parse_rejects(reply: str, reason: str) -> None:
    assert parse_correction(reply, n_steps=4) == (None, reason)


def test_step_range_needs_the_path_length_to_reject_high_steps() -> None:
    assert parse_correction(GOOD.replace("Step 2.", "Step 9.", 1)).reason == ""
    assert parse_correction(GOOD.replace("Step 2.", "Step 9.", 1), n_steps=9).reason == ""
    assert parse_correction(GOOD.replace("Step 2.", "Step 9.", 1), n_steps=8).reason == "step number out of range"


def test_text_round_trips_and_drops_chatter() -> None:
    correction = parse_correction("Sure!\n**Incorrect Step:** 2\n" + GOOD.split("\n", 1)[1] + "\nBye!").correction
    assert correction.text() == GOOD
    assert parse_correction(correction.text()).correction == correction


# ---- review: parsed and graded against the gold ---------------------------------------------------------------


def test_review_keeps_only_corrections_that_reach_the_gold() -> None:
    assert review(BOOK, GOOD, 4) == Review(KEPT, Correction(2, EXPLANATION, SOLUTION, "55"))
    wrong = review(BOOK, GOOD.replace("55", "45"), 4)
    assert wrong.status == WRONG_FINAL_ANSWER and wrong.correction.answer == "45"
    assert review(BOOK, "no idea", 4) == Review("no Incorrect Step", None)


def test_review_rejects_a_right_number_that_no_computation_gives() -> None:
    # The 1.5B teacher's shape on GSM8K: the gold restated as a step, the wrong path's nonsense kept after it.
    stated = (
        "Incorrect Step: Step 1.\nExplanation: The student did not count the pages.\nCorrect Solution:\n"
        "Step 1: The answer is 55.\nStep 2: This is a geometric progression.\nThe answer is 55."
    )
    assert review(BOOK, stated, 4).status == UNWORKED
    worked = stated.replace("Step 1: The answer is 55.", "Step 1: 100 - 45 = 55 pages are left.")
    assert review(BOOK, worked, 4).status == KEPT


def test_the_corrector_reply_survives_json() -> None:
    for result in (review(BOOK, GOOD, 4), review(BOOK, "no idea", 4)):
        reply = CorrectorReply(text="t", review=result, steps=4)
        assert CorrectorReply.model_validate_json(reply.model_dump_json()) == reply


def test_review_grades_choice_items() -> None:
    item = Example("c/1", "arc", "Which is a metal?\nOptions:\n(A) wood\n(B) iron", "(B)", "choice", ("wood", "iron"))
    reply = (
        "Incorrect Step: Step 1.\nExplanation: wood is not a metal.\nCorrect Solution:\nIron is.\nThe answer is (B)."
    )
    assert review(item, reply, 2).status == KEPT
    assert review(item, reply.replace("(B)", "(A)"), 2).status == WRONG_FINAL_ANSWER
    assert gold_answer(item) == "(B) iron"
    assert gold_answer(BOOK) == "55"


# ---- steps -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        (
            WRONG_PATH,
            [
                "On Tuesday Tom reads 15 * 2 = 30 pages.",
                "In total he has read 30 pages.",
                "So 100 - 30 = 70 pages are left.",
                "The answer is 70.",
            ],
        ),
        (
            "A pen costs $1.50. Four cost 4 * 1.50 = $6.00. The answer is 6.",
            ["A pen costs $1.50.", "Four cost 4 * 1.50 = $6.00.", "The answer is 6."],
        ),
        ("Step 1: Add.\nStep 2: Subtract.", ["Add.", "Subtract."]),
        ("1. Add 2.\n2) Then add 3.\n- The answer is 5.", ["Add 2.", "Then add 3.", "The answer is 5."]),
        (
            "Mrs. Smith has 3 cats. Dr. Lee has 2!  Together: 5",
            ["Mrs. Smith has 3 cats.", "Dr. Lee has 2!", "Together: 5"],
        ),
        ("so 3 cats. then 2 more, e.g. dogs", ["so 3 cats. then 2 more, e.g. dogs"]),
        ("\n\n  **\n", []),
        ("", []),
    ],
)
def test_split_steps(path: str, steps: list[str]) -> None:
    assert split_steps(path) == steps


def test_prompts_number_the_steps_and_keep_the_gold_from_the_student() -> None:
    steps = split_steps(WRONG_PATH)
    chat = corrector_messages(BOOK, steps)
    assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * len(worked_examples()) + ["user"]
    assert "Correct answer: 55" in chat[-1]["content"]
    assert "Step 4: The answer is 70." in chat[-1]["content"] and BOOK.input in chat[-1]["content"]
    training = correction_prompt(BOOK.input, steps)
    assert format_steps(steps) in training and "55" not in training and "Incorrect Step" in training


def test_worked_examples_follow_the_format_they_teach() -> None:
    """Each worked example is a user turn like the real one and a reply that parses and reaches its stated gold."""
    examples = worked_examples()
    assert 2 <= len(examples) <= 3
    template = load_prompt("corrector_user")
    for user, reply in examples:
        gold = re.search(r"^Correct answer: (\S+)$", user, re.MULTILINE).group(1)
        question = user.removeprefix("Question:\n").split("\n\nCorrect answer:")[0]
        steps = re.findall(r"^Step \d+: (.*)$", user, re.MULTILINE)
        assert user == template.format(question=question, gold=gold, steps=format_steps(steps))
        correction, reason = parse_correction(reply, len(steps))
        assert reason == "" and correction.answer == gold and correction.text() == reply


# ---- the agent, on a scripted backend -------------------------------------------------------------------------


async def test_agent_reviews_its_reply() -> None:
    corrector = ScriptedBackend(lambda messages, settings: "Here you go:\n" + GOOD, model_id="strong")
    agent = CorrectorAgent(BOOK, BackendChatCompletionClient(corrector))
    response = await agent.on_messages([TextMessage(content=WRONG_PATH, source="student")], CancellationToken())
    message = response.chat_message
    assert message.source == "corrector" and message.to_text() == "Here you go:\n" + GOOD
    assert isinstance(message, StructuredMessage) and message.content.steps == 4  # typed, not a string
    assert message.content.review == Review(KEPT, Correction(2, EXPLANATION, SOLUTION, "55"))
    ((messages, _settings),) = corrector.calls
    assert messages == corrector_messages(BOOK, split_steps(WRONG_PATH))  # the worked examples went as turns
    assert "Step 2: In total he has read 30 pages." in messages[-1]["content"]
    assert "Correct answer: 55" in messages[-1]["content"]


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (GOOD.replace("55", "45"), WRONG_FINAL_ANSWER),
        (GOOD.replace("Step 2.", "Step 7.", 1), "step number out of range"),
        ("I cannot find an error.", "no Incorrect Step"),
    ],
)
async def test_agent_rejects(reply: str, status: str) -> None:
    agent = CorrectorAgent(BOOK, BackendChatCompletionClient(ScriptedBackend(lambda messages, settings: reply)))
    result = await agent.run(task=WRONG_PATH)  # AutoGen's own entry point: the task is the path to correct
    [content] = contents(result.messages, CorrectorReply)
    assert content.review.status == status
    assert result.messages[-1].to_text() == reply
