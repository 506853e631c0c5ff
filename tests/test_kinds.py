"""Answer kinds and the task table: one example of each kind pins its prompt, extraction and verdict; a kind or a
benchmark family added to its table is picked up with no other edit."""

import json
import random
from pathlib import Path

import pytest

from agents.instructor import parse_samples
from agents.student import student_messages
from runtime.data import tasks
from runtime.data.graders import Grade
from runtime.data.kinds import KINDS, Text, grade, grade_async, kind_of, parse_options
from runtime.data.tasks import FAMILIES, Example, Family, load_jsonl, load_task, task_names
from runtime.errors import ConfigError
from training.instruct.benchmarks import default_ood
from training.instruct.supply import RowStyle

CHOICE = Example(
    "q/1",
    "bbq/Age",
    "Who forgot?\nOptions:\n(A) The grandson\n(B) Cannot answer",
    "(B)",
    "choice",
    ("The grandson", "Cannot answer"),
)
NUMBER = Example("g/1", "gsm8k", "Ann has 3 eggs and buys 4. How many?", "7", "number")
TEXT = Example("b/1", "bbh/dyck", "Close the brackets: ( [", "] )", "text")
CODE = Example(
    "c/1",
    "mbpp",
    "Write add(a, b).",
    "def add(a, b):\n    return a + b",
    "code",
    metadata={"prefix": "", "tests": "assert add(1, 2) == 3", "entry_point": "add"},
)


@pytest.mark.parametrize(
    ("example", "system", "reply", "extracted", "verdict"),
    [
        (
            CHOICE,
            "You answer multiple-choice questions. Think briefly, then end your reply with "
            '"The answer is (X)", where X is the letter of the option you choose.',
            "Nothing says who forgot. The answer is (B).",
            "(B)",
            "correct",
        ),
        (
            NUMBER,
            'You solve math word problems. Reason step by step, then end your reply with "The answer is N", where N is '
            "the final number.",
            "3 + 4 = 7 eggs.\n#### 7.00",
            "7",
            "correct",
        ),
        (
            TEXT,
            'You answer questions. Think briefly, then end your reply with "The answer is X", where X is your final '
            "answer.",
            "The answer is ) ].",
            ") ]",
            "wrong",
        ),
        (
            CODE,
            "You write Python code. Write the function the task asks for, with the name and signature it gives, in one "
            "```python code block. Do not add examples or explanations after the code.",
            "```python\ndef add(a, b):\n    return a - b\n```",
            "def add(a, b):\n    return a - b",
            None,  # graded by running it: see test_code.py
        ),
    ],
)
def test_each_kind_pins_its_prompt_extraction_and_verdict(
    example: Example, system: str, reply: str, extracted: str, verdict: str | None
) -> None:
    kind = kind_of(example)
    assert kind is KINDS[example.answer_kind] and kind.name == example.answer_kind
    assert student_messages(example) == [
        {"role": "system", "content": system},
        {"role": "user", "content": example.input},
    ]
    assert kind.extract(reply, example) == extracted
    if verdict is not None:
        assert grade(example, reply) == Grade(verdict, extracted)  # type: ignore[arg-type]
        assert grade(example, " ").verdict == "no_answer"


def test_each_kind_writes_its_gold_reply() -> None:
    solved = Example("g/2", "gsm8k", "q", "72", "number", (), {"solution": "48 + 24 = <<48+24=72>>72\n#### 72"})
    assert kind_of(solved).gold_reply(solved) == "48 + 24 = 72\nThe answer is 72."
    assert kind_of(NUMBER).gold_reply(NUMBER) == "The answer is 7."
    assert kind_of(TEXT).gold_reply(TEXT) == "The answer is ] )."
    assert kind_of(CODE).gold_reply(CODE) == "```python\ndef add(a, b):\n    return a + b\n```"
    assert kind_of(CHOICE).gold_reply(CHOICE, name_option=True) == "Cannot answer. The answer is (B)."
    for seed in range(4):  # a shuffled row keeps its gold on the right option, whichever order it shows
        row = RowStyle(shuffle_options=True).row(CHOICE, "wrong", random.Random(seed))
        options = parse_options(row["messages"][1]["content"])
        assert sorted(options) == sorted(CHOICE.options)
        assert options["ABC".index(row["target"].strip("()"))] == "Cannot answer"


def test_only_code_refuses_instructor_written_rows() -> None:
    assert [k.name for k in KINDS.values() if not k.instructor_strategies] == ["code"]


class Shout(Text):
    """A kind no code knows of: the answer is the reply's last word, upper-cased, under the number prompt."""

    name = "shout"
    student_prompt = "student_number"

    def extract(self, reply: str, example: Example) -> str | None:
        words = reply.split()
        return words[-1].strip(".").upper() if words else None

    def matches(self, predicted: str, example: Example) -> bool:
        return predicted == example.target


async def test_a_kind_registered_in_the_table_is_graded_and_prompted_with_no_other_edit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(KINDS, "shout", Shout())
    item = Example("s/1", "s", "Say hi.", "HI", "shout")
    assert grade(item, "I say hi.") == Grade("correct", "HI")
    assert (await grade_async(item, "I say ho.")) == Grade("wrong", "HO")
    assert student_messages(item)[0]["content"].startswith("You solve math word problems.")
    assert parse_samples("1. Question: Say yo. Answer: YO", "shout").samples[0].target == "YO"
    (tmp_path / "mine.jsonl").write_text(json.dumps({"input": "Say hi.", "target": "HI"}) + "\n")
    assert load_jsonl(tmp_path / "mine.jsonl", "shout")[0].answer_kind == "shout"


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ConfigError, match="use one of: choice, number, text"):
        load_jsonl(Path("x.jsonl"), "code")
    with pytest.raises(Exception, match="unknown answer kind 'essay'"):
        grade(Example("e/1", "s", "q", "a", "essay"), "a")


def test_a_multiple_choice_family_is_one_entry_of_the_task_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """ARC-Easy in ARC's file format: one table entry, no other edit, and it loads, splits and pairs."""
    rows = [
        {
            "id": f"E{i}",
            "question": f"Which {i}?",
            "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
            "answerKey": "C",
        }
        for i in range(4)
    ]
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "arc_easy.json").write_text(json.dumps({"gather_id": ["E0", "E1", "E2"], "exam_id": ["E3"]}))
    easy = Family("arc_easy", tasks._load_arc, "arc_easy/test.jsonl", "arc_easy.json", "choice", ood="arc_challenge")
    monkeypatch.setitem(FAMILIES, "arc_easy", easy)
    assert "arc_easy" in task_names()
    [item] = load_task("arc_easy", "examine", tmp_path)
    assert (item.id, item.source, item.target, item.options) == ("arc_easy/E3", "arc_easy", "(C)", ("x", "y", "z"))
    assert kind_of(item).grade(item, "The answer is (C).").verdict == "correct"
    assert [e.id for e in load_task("arc_easy", "gather", tmp_path, limit=2)] == ["arc_easy/E0", "arc_easy/E1"]
    assert default_ood(["arc_easy"], tmp_path) == ["arc_challenge", "bbh"]
