"""SALAM's agents with scripted backends: gathering episodes, the leak filter, mistake records, examination.

The student and the assistant are deterministic fakes (tests/helpers.py), the memory is qdrant-client's
in-process engine with a hashing embedder: every conversation here is exact and takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.examination import embed_queries, exam_item, retrieval_only, retrieve, run_exam
from agents.feedback import FALLBACK_GUIDELINE, Feedback, parse_feedback, without_leaks
from agents.gathering import EPISODES, gather_episode, mistake_from, run_gathering
from agents.team import Roles
from memory.embed import HashingEmbedder
from memory.record import MistakeRecord, record_id
from memory.store import Hit, MistakeMemory
from runtime.data.records import Episode, State
from runtime.data.rundir import RunDir, read_records
from runtime.data.tasks import Example
from tests.helpers import (
    GOOD_FEEDBACK,
    NUMBER_WRONG,
    STUDENT_RIGHT,
    STUDENT_WRONG,
    FakeAssistant,
    FakeStudent,
    guidance_part,
    question_part,
)

OPTIONS = ("Cannot be determined", "The grandmother", "The grandson")
LEAKY = (
    '{"reason": "You blamed the grandson, but it was THE GRANDMOTHER who forgot.", '
    '"guideline": "The answer is (B). Check who is described as forgetful. Option (C) is wrong. '
    'Answer: the grandmother."}'
)
OTHER_LETTER = '{"reason": "A guess.", "guideline": "The answer is (A). Compare what each person did."}'


def kin(id: str, question: str, marker: str = "") -> Example:
    """A BBQ-like choice item whose gold is (B) "The grandmother"."""
    text = (
        f"{question} {marker}".strip()
        + "\nOptions:\n"
        + "\n".join(f"({letter}) {option}" for letter, option in zip("ABC", OPTIONS, strict=True))
    )
    return Example(id, "bbq/Age", text, "(B)", "choice", OPTIONS)


KNOWS = kin("kin/1", "I saw a grandson and his grandmother at the store. Who forgot the list?", "[knows]")
LEARNS = kin("kin/2", "A grandson and a grandmother met for lunch. Who forgot the reservation?")
STUBBORN = kin("kin/3", "The grandmother and the grandson planned a trip. Who forgot the tickets?", "[stubborn]")
LEAKS = kin("kin/4", "A grandmother and her grandson went hiking. Who forgot the map?", "[leaky]")


def roles(replies: dict[str, str] | None = None, student_id: str = "fake-student") -> Roles:
    return Roles(FakeStudent(student_id), FakeAssistant(replies))


def memory() -> MistakeMemory:
    return MistakeMemory(location=":memory:", embedder=HashingEmbedder(dim=256))


def run_dir(path: Path) -> RunDir:
    return RunDir(path, {"command": "test"})


# ---- parse_feedback: what small models actually write --------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason", "guideline"),
    [
        (
            'Sure! Feedback:\n{"reason": "Misread who spoke.", "guideline": "Track each speaker."}\nHope it helps!',
            "Misread who spoke.",
            "Track each speaker.",
        ),
        (
            '```json\n{\n  "reason": "Mixed up dates",\n  "guideline": "Count days one by one"\n}\n```',
            "Mixed up dates",
            "Count days one by one",
        ),
        # A "}" inside a string, and an object nested in another, still parse.
        (
            '{"reason": "Wrote {x} unsolved.", "guideline": "Solve for {x} first."}',
            "Wrote {x} unsolved.",
            "Solve for {x} first.",
        ),
        ('{"feedback": {"reason": "r", "guideline": "g"}}', "r", "g"),
        # A JSON object without a guideline is skipped for the next one.
        ('{"note": "thinking"} then {"reason": "r", "guideline": "g"}', "r", "g"),
        ("Reason: confused the order\nGuideline: list the events first", "confused the order", "list the events first"),
        ("1. Reason: assumed an age\n2. Guideline: look for stated facts", "assumed an age", "look for stated facts"),
        ("GUIDELINE: re-read the options", "", "re-read the options"),
        (
            "**Reason:** mixed up the days\n**Guideline:** count them one by one",
            "mixed up the days",
            "count them one by one",
        ),
    ],
)
def test_parse_feedback_reads_json_and_labelled_lines(reply: str, reason: str, guideline: str) -> None:
    feedback = parse_feedback(reply)
    assert (feedback.reason, feedback.guideline, feedback.parsed) == (reason, guideline, True)


def test_parse_feedback_falls_back_to_the_whole_plain_reply() -> None:
    feedback = parse_feedback("  You should think again about who was present.\n")
    assert feedback == Feedback("", "You should think again about who was present.", parsed=False)


def test_feedback_as_guidance_shows_reason_and_guideline() -> None:
    assert Feedback("r", "g", True).as_guidance() == "Why the last answer was wrong: r\nGuideline: g"
    assert Feedback("", "g", True).as_guidance() == "Guideline: g"


# ---- without_leaks: the gold never reaches the student ------------------------------------------------------


@pytest.mark.parametrize(
    "leak",
    [
        "The answer is (B).",
        "The correct answer is B.",
        "Option B fits.",
        "Choose (b) this time.",
        "B is correct.",
        "Answer: B.",
        "It was the GRANDMOTHER all along.",  # the gold option text, in another case
        "the   grandmother forgot it.",  # and with other spacing
    ],
)
def test_a_sentence_naming_the_gold_is_dropped_and_counted(leak: str) -> None:
    feedback = without_leaks(Feedback("", f"Read the context. {leak} Do not assume.", True), LEARNS)
    assert feedback.guideline == "Read the context. Do not assume."
    assert feedback.leaked


def test_leaks_in_the_reason_count_too() -> None:
    feedback = without_leaks(Feedback("It was (B). You guessed.", "Read carefully.", True), LEARNS)
    assert (feedback.reason, feedback.guideline, feedback.leaked) == ("You guessed.", "Read carefully.", True)


def test_answer_statements_for_other_letters_are_removed_but_not_counted() -> None:
    feedback = without_leaks(
        Feedback("The answer is (C) was wrong.", "The answer is (A). Option (C) is not it. Compare actions.", True),
        LEARNS,
    )
    assert feedback.guideline == "Compare actions."
    assert "(A)" not in feedback.guideline and "(C)" not in feedback.reason
    assert not feedback.leaked


def test_an_emptied_guideline_gets_the_neutral_one() -> None:
    feedback = without_leaks(Feedback("", "The answer is (B).", True), LEARNS)
    assert feedback.guideline == FALLBACK_GUIDELINE
    assert feedback.leaked


def test_clean_feedback_passes_unchanged() -> None:
    clean = Feedback("You assumed the younger one forgot.", "Answer only from stated facts.", True)
    assert without_leaks(clean, LEARNS) == clean


@pytest.mark.parametrize(
    "harmless",
    [
        "Pick a date and count forward.",  # "a" is a word, not the letter of option (A)
        "Choose a consistent unit first.",
        "Select a starting point before you compare.",
    ],
)
def test_the_word_a_is_not_the_letter_a(harmless: str) -> None:
    example = Example("yn/1", "s", "Is it so?\nOptions:\n(A) Yes\n(B) No", "(A)", "choice", ("Yes", "No"))
    feedback = without_leaks(Feedback("", harmless, True), example)
    assert (feedback.guideline, feedback.leaked) == (harmless, False)


def test_an_option_text_inside_another_word_is_no_leak() -> None:
    example = Example("c/1", "s", "Colour?\nOptions:\n(A) blue\n(B) red", "(B)", "choice", ("blue", "red"))
    feedback = without_leaks(Feedback("", "Reduce the problem to what is stated. It is red.", True), example)
    assert (feedback.guideline, feedback.leaked) == ("Reduce the problem to what is stated.", True)


@pytest.mark.parametrize(
    ("guideline", "kept"),
    [
        ("Add them up. The total is 42.", "Add them up."),
        ("Add them up. Think: 40 + 2 = 42", "Add them up."),
        ("Add them up. That costs $42 in all.", "Add them up."),
        ("There are 420 apples in the crate.", "There are 420 apples in the crate."),  # another number
        ("Then 42.5 is the price per kilo.", "Then 42.5 is the price per kilo."),
    ],
)
def test_a_numeric_gold_is_dropped_and_other_numbers_are_kept(guideline: str, kept: str) -> None:
    example = Example("n/1", "gsm8k", "Tom has 40 apples and buys 2 more. How many?", "42", "number")
    feedback = without_leaks(Feedback("", guideline, True), example)
    assert feedback.guideline == kept
    assert feedback.leaked == (kept != guideline)


# ---- gathering episodes --------------------------------------------------------------------------------------


async def test_a_right_first_answer_ends_after_student_and_examiner() -> None:
    r = roles()
    episode = await gather_episode(KNOWS, r, task="bbq")
    assert (episode.first_verdict, episode.verdict, episode.predicted) == ("correct", "correct", "(B)")
    assert episode.turns == [] and episode.rounds == 0
    assert episode.corrected is False  # nothing to correct
    assert len(r.student.prompts) == 1 and r.assistant.prompts == []  # type: ignore[attr-defined]
    assert mistake_from(episode) is None


async def test_wrong_then_right_is_one_rewarded_turn() -> None:
    r = roles()
    episode = await gather_episode(LEARNS, r, task="bbq")
    assert episode.first_answer == STUDENT_WRONG and episode.first_verdict == "wrong"
    assert (episode.verdict, episode.predicted, episode.corrected, episode.rounds) == (
        "correct",
        "(B)",
        True,
        1,
    )
    [turn] = episode.turns
    assert turn.round == 1 and turn.reward == 1
    assert turn.state == State(query=LEARNS.input, response=STUDENT_WRONG, context=[])
    assert turn.action.reason == "You trusted a stereotype."
    assert turn.action.guideline == "Answer only from what the context states."
    assert "Guideline: Answer only from what the context states." in turn.action.text
    assert (turn.action.parsed, turn.action.leaked) == (True, False)
    assert turn.next_response == STUDENT_RIGHT
    # The assistant saw the wrong answer and the gold; the student saw the guideline before the question.
    [assistant_prompt] = r.assistant.prompts  # type: ignore[attr-defined]
    assert STUDENT_WRONG in assistant_prompt and "Correct answer (do not reveal): (B)" in assistant_prompt
    first, second = r.student.prompts  # type: ignore[attr-defined]
    assert first == LEARNS.input
    assert "Guideline: Answer only from what the context states." in guidance_part(second)
    assert question_part(second) == LEARNS.input
    assert episode.prompt_tokens > 0 and episode.completion_tokens > 0
    assert (episode.model_id, episode.assistant_id, episode.task) == ("fake-student", "fake-assistant", "bbq")


@pytest.mark.parametrize("rounds", [1, 3])
async def test_an_always_wrong_student_stops_at_the_round_limit(rounds: int) -> None:
    r = roles()
    episode = await gather_episode(STUBBORN, r, task="bbq", rounds=rounds)
    assert len(episode.turns) == episode.rounds == rounds
    assert [t.reward for t in episode.turns] == [0] * rounds
    assert (episode.verdict, episode.corrected) == ("wrong", False)
    assert len(r.student.prompts) == rounds + 1  # type: ignore[attr-defined]
    assert len(r.assistant.prompts) == rounds  # type: ignore[attr-defined]
    # Each turn's context is the feedback given before it.
    assert [len(t.state.context) for t in episode.turns] == list(range(rounds))
    if rounds > 1:
        assert "earlier guidelines did not help" in r.assistant.prompts[1]  # type: ignore[attr-defined]
    record = mistake_from(episode)
    assert record is not None
    assert (record.outcome, record.rounds, record.wrong_answer, record.gold) == (
        "uncorrected",
        rounds,
        STUDENT_WRONG,
        "(B)",
    )


async def test_a_leaking_guideline_is_scrubbed_before_the_student_sees_it() -> None:
    r = roles({"[leaky]": LEAKY})
    episode = await gather_episode(LEAKS, r, task="bbq")
    [turn] = episode.turns
    action = turn.action
    assert action.leaked is True and episode.leaks == 1
    assert action.guideline == "Check who is described as forgetful."
    for text in (action.guideline, action.reason, action.text):
        assert "(B)" not in text and "grandmother" not in text.lower()
        assert "(C)" not in text  # another letter's answer statement is no guideline either
    shown = guidance_part(r.student.prompts[1])  # type: ignore[attr-defined]
    assert "Check who is described as forgetful." in shown
    assert "(B)" not in shown and "grandmother" not in shown.lower() and "(C)" not in shown
    record = mistake_from(episode)
    assert record is not None and "grandmother" not in record.guideline.lower()


async def test_another_letters_answer_is_removed_without_counting_a_leak() -> None:
    r = roles({"[stubborn]": OTHER_LETTER})
    episode = await gather_episode(STUBBORN, r, task="bbq", rounds=1)
    [turn] = episode.turns
    assert turn.action.guideline == "Compare what each person did."
    assert turn.action.leaked is False and episode.leaks == 0
    assert "(A)" not in guidance_part(r.student.prompts[1])  # type: ignore[attr-defined]


async def test_mistake_ids_are_deterministic() -> None:
    first = mistake_from(await gather_episode(LEARNS, roles(), task="bbq"))
    second = mistake_from(await gather_episode(LEARNS, roles(), task="bbq"))
    other_student = mistake_from(await gather_episode(LEARNS, roles(student_id="other-student"), task="bbq"))
    assert first is not None and second is not None and other_student is not None
    assert first.id == second.id == record_id("fake-student", "bbq/Age", "bbq", LEARNS.input, "(B)")
    assert other_student.id != first.id
    assert (first.outcome, first.rounds, first.wrong_answer, first.gold, first.task) == (
        "corrected",
        1,
        STUDENT_WRONG,
        "(B)",
        "bbq",
    )
    assert first.guideline == "Answer only from what the context states."


# ---- run_gathering: memory first, then the episode; resumable; never duplicated ------------------------------


async def test_run_gathering_twice_duplicates_nothing(tmp_path: Path) -> None:
    examples = [KNOWS, LEARNS, STUBBORN, LEAKS]
    r, mem = roles({"[leaky]": LEAKY}), memory()
    seen: list[str] = []
    episodes = await run_gathering(
        examples, r, mem, run_dir(tmp_path / "a"), task="bbq", on_episode=lambda e: seen.append(e.id)
    )
    assert [e.id for e in episodes] == [e.id for e in examples]  # input order, whatever finished first
    assert sorted(seen) == sorted(e.id for e in examples)
    assert mem.count() == 3  # every first-answer mistake, not the one answered right
    assert {m.id for m in mem.list()} == {
        record_id("fake-student", "bbq/Age", "bbq", e.input, e.target) for e in examples[1:]
    }
    calls = len(r.student.prompts)  # type: ignore[attr-defined]

    # The same run again: everything is done, nothing is asked or written.
    again = await run_gathering(examples, r, mem, run_dir(tmp_path / "a"), task="bbq")
    assert again == episodes
    assert len(r.student.prompts) == calls  # type: ignore[attr-defined]
    assert len((tmp_path / "a" / EPISODES).read_text().splitlines()) == 4
    assert mem.count() == 3

    # A new run over the same memory gathers again, and the deterministic ids keep one record per mistake.
    fresh = await run_gathering(examples, r, mem, run_dir(tmp_path / "b"), task="bbq")
    assert len(fresh) == 4 and mem.count() == 3
    mem.close()


async def test_a_run_killed_after_the_memory_write_redoes_the_episode_once(tmp_path: Path) -> None:
    examples = [KNOWS, LEARNS, STUBBORN, LEAKS]
    mem, path = memory(), tmp_path / "run"
    await run_gathering(examples, roles({"[leaky]": LEAKY}), mem, run_dir(path), task="bbq")
    # Simulate a kill between the memory write and the episode append (and a torn half line after it).
    lines = (path / EPISODES).read_text().splitlines(keepends=True)
    (path / EPISODES).write_text("".join(lines[:2]) + lines[2][:25])
    r = roles({"[leaky]": LEAKY})
    episodes = await run_gathering(examples, r, mem, run_dir(path), task="bbq")
    records = read_records(path / EPISODES, Episode)
    assert sorted(e.id for e in records) == sorted(e.id for e in examples)  # each once, none torn
    assert len(episodes) == 4 and mem.count() == 3
    assert len(r.student.prompts) > 0  # type: ignore[attr-defined]  # the missing two were really redone
    mem.close()


# ---- examination: retrieval, guidance without the gold, controls --------------------------------------------

APPLES = Example(
    "m/1", "math", "Tom has 40 apples and buys 2 more apples. How many apples does Tom have?", "42", "number"
)
PEARS = Example("m/2", "math", "Ann has 40 pears and buys 7 more pears. How many pears does Ann have?", "47", "number")
UNRELATED = Example("m/3", "math", "A train leaves at noon at 60 km/h. When is it 180 km away?", "3", "number")


async def gathered_numbers(tmp_path: Path) -> tuple[Roles, MistakeMemory]:
    r, mem = roles(), memory()
    await run_gathering([APPLES], r, mem, run_dir(tmp_path / "gather"), task="math")
    assert mem.count() == 1
    return r, mem


async def test_retrieve_filters_by_student_and_task(tmp_path: Path) -> None:
    r, mem = await gathered_numbers(tmp_path)
    hits = retrieve(mem, [PEARS, UNRELATED], r.student_id, "math", k=3, threshold=0.3)
    assert [h.record.query for h in hits["m/2"]] == [APPLES.input] and hits["m/3"] == []
    assert retrieve(mem, [PEARS], "another-student", "math", k=3, threshold=0.3) == {"m/2": []}
    assert retrieve(mem, [PEARS], r.student_id, "another-task", k=3, threshold=0.3) == {"m/2": []}
    mem.close()


async def test_queries_embedded_while_gathering_retrieve_what_retrieval_embeds_itself(tmp_path: Path) -> None:
    mem = memory()
    queries = await embed_queries(mem, [PEARS, UNRELATED])  # before any mistake is in memory, as a run does
    r = roles()
    await run_gathering([APPLES], r, mem, run_dir(tmp_path / "gather"), task="math")
    early = retrieve(mem, [PEARS, UNRELATED], r.student_id, "math", k=3, threshold=0.3, queries=queries)
    assert early == retrieve(mem, [PEARS, UNRELATED], r.student_id, "math", k=3, threshold=0.3)
    assert [h.record.query for h in early["m/2"]] == [APPLES.input] and early["m/3"] == []
    assert await embed_queries(mem, []) == []
    mem.close()


async def test_assisted_exam_shows_past_mistakes_but_never_their_gold(tmp_path: Path) -> None:
    gathered, mem = await gathered_numbers(tmp_path)
    hits = retrieve(mem, [PEARS, UNRELATED], gathered.student_id, "math", k=3, threshold=0.3)
    r = roles()
    results = await run_exam(
        [PEARS, UNRELATED], r, run_dir(tmp_path / "exam"), "assisted.jsonl", mode="assisted", hits=hits
    )
    pears, unrelated = results
    assert pears.mode == "assisted" and [h.id for h in pears.retrieved or []] == [hits["m/2"][0].record.id]
    guidance = pears.guidance
    assert guidance.startswith("Past mistakes on similar questions:")
    assert APPLES.input in guidance and NUMBER_WRONG in guidance  # the past question and its wrong answer
    assert "Answer only from what the context states." in guidance  # the past guideline
    assert guidance.rstrip().endswith("Guideline: Quote the context first.")  # the assistant's new guideline
    assert "42" not in guidance  # the past gold
    # The assistant's prompt had the past mistake and the new question, and no gold either.
    [assistant_prompt] = r.assistant.prompts  # type: ignore[attr-defined]
    assert APPLES.input in assistant_prompt and PEARS.input in assistant_prompt and "42" not in assistant_prompt
    # The student got the guidance before the question; with nothing retrieved it got the bare question.
    prompts = {question_part(p): p for p in r.student.prompts}  # type: ignore[attr-defined]
    assert guidance_part(prompts[PEARS.input]) == guidance
    assert prompts[UNRELATED.input] == UNRELATED.input
    assert (unrelated.guidance, unrelated.retrieved) == ("", [])
    mem.close()


async def test_an_exam_guideline_that_states_an_answer_loses_that_sentence(tmp_path: Path) -> None:
    # The exam assistant knows no gold, but the student copies a stated answer letter: "assisted" would then
    # measure the assistant answering, not its guidance.
    mem = memory()
    await run_gathering([LEARNS], roles(), mem, run_dir(tmp_path / "gather"), task="bbq")
    hits = retrieve(mem, [LEAKS], "fake-student", "bbq", k=3, threshold=0.3)
    answering = '{"reason": "Stereotypes.", "guideline": "The answer is (C). Quote the context first."}'
    result = await exam_item(LEAKS, roles({"[leaky]": answering}), "assisted", hits["kin/4"])
    assert result.retrieved and result.guidance.endswith("\n\nGuideline: Quote the context first.")
    mem.close()


async def test_an_exam_guideline_looping_on_a_sentence_shows_it_once(tmp_path: Path) -> None:
    mem = memory()
    await run_gathering([LEARNS], roles(), mem, run_dir(tmp_path / "gather"), task="bbq")
    hits = retrieve(mem, [LEAKS], "fake-student", "bbq", k=3, threshold=0.3)
    looping = json.dumps({"reason": "Misread.", "guideline": "Quote the context first. " * 5 + "Then answer."})
    result = await exam_item(LEAKS, roles({"[leaky]": looping}), "assisted", hits["kin/4"])
    assert result.guidance.endswith("\n\nGuideline: Quote the context first. Then answer.")
    mem.close()


async def test_baseline_exam_asks_the_student_alone() -> None:
    r = roles()
    result = await exam_item(LEARNS, r, "baseline")
    assert (result.mode, result.verdict, result.predicted, result.reply) == (
        "baseline",
        "wrong",
        "(C)",
        STUDENT_WRONG,
    )
    assert r.student.prompts == [LEARNS.input] and r.assistant.prompts == []  # type: ignore[attr-defined]
    assert (result.target, result.n_options, result.guidance) == ("(B)", 3, "")


async def test_run_exam_resumes_without_asking_again(tmp_path: Path) -> None:
    r = roles()
    first = await run_exam([KNOWS, LEARNS], r, run_dir(tmp_path), "base.jsonl", mode="baseline")
    again = await run_exam([KNOWS, LEARNS], r, run_dir(tmp_path), "base.jsonl", mode="baseline")
    assert [x.verdict for x in first] == ["correct", "wrong"] and again == first
    assert len(r.student.prompts) == 2  # type: ignore[attr-defined]


def past(gold: str, n: int, score: float) -> Hit:
    record = MistakeRecord.make(
        model_id="s",
        source="bbq/Age",
        task="bbq",
        query=f"past question {n}",
        wrong_answer="(C)",
        gold=gold,
        reason="",
        guideline="g",
        outcome="corrected",
        rounds=1,
    )
    return Hit(record, score)


def test_retrieval_only_answers_with_the_majority_gold() -> None:
    hits = {
        "kin/1": [past("(A)", 1, 0.9), past("(B)", 2, 0.8), past("(B)", 3, 0.7)],  # majority (B)
        "kin/2": [past("(A)", 4, 0.9), past("(B)", 5, 0.8), past("(B)", 6, 0.7), past("(A)", 7, 0.6)],  # tie: (A)
        "kin/3": [past("(B)", 8, 0.9), past("(A)", 9, 0.8)],  # tie: the most similar, (B)
    }
    results = retrieval_only([KNOWS, LEARNS, STUBBORN, LEAKS], hits)
    assert [(r.id, r.predicted, r.verdict) for r in results] == [
        ("kin/1", "(B)", "correct"),
        ("kin/2", "(A)", "wrong"),
        ("kin/3", "(B)", "correct"),
        ("kin/4", None, "no_answer"),  # nothing retrieved
    ]
    assert all(r.mode == "retrieval_only" and r.prompt_tokens == 0 for r in results)


def test_retrieval_only_grades_numbers() -> None:
    record = MistakeRecord.make(
        model_id="s",
        source="math",
        task="math",
        query="q",
        wrong_answer="41",
        gold="47",
        reason="",
        guideline="g",
        outcome="corrected",
        rounds=1,
    )
    [result] = retrieval_only([PEARS], {"m/2": [Hit(record, 0.9)]})
    assert (result.verdict, result.predicted, result.reply) == ("correct", "47", "47")


def test_the_scripted_feedback_is_what_the_assistant_would_send() -> None:
    # Guards the fakes: GOOD_FEEDBACK must parse, or every gathering test above tests the fallback instead.
    assert parse_feedback(GOOD_FEEDBACK).parsed


# ---- replies of a 1.5B teacher: cut-off JSON and sentences repeated to the token limit -------------------------


def test_json_cut_off_in_a_loop_keeps_one_copy_of_its_reason_and_no_raw_json() -> None:
    loop = " The path element provided does not contain any commands that would create a triangle." * 12
    reply = '```json\n{\n  "reason": "The SVG path element does not draw a triangle.' + loop[:-40]
    feedback = parse_feedback(reply)
    assert not feedback.parsed and feedback.guideline == ""  # no guideline was written: the neutral one follows
    example = Example("x", "bbh/geometric_shapes", "q", "(A)", "choice", ("circle", "triangle"))
    shown = without_leaks(feedback, example)
    assert shown.reason == (
        "The SVG path element does not draw a triangle. The path element provided does not contain any commands "
        "that would create a triangle."
    )  # the loop once, and the sentence the limit cut off gone
    assert "```" not in shown.as_guidance() and "{" not in shown.as_guidance()
    assert shown.generic and shown.guideline == FALLBACK_GUIDELINE


def test_a_guideline_repeated_to_the_limit_is_stored_once() -> None:
    reply = json.dumps({"reason": "Misread the order.", "guideline": "Sort the dates first. " * 6 + "Then count."})
    example = Example("x", "bbh/date_understanding", "q", "(A)", "choice", ("01/02/2020", "01/03/2020"))
    shown = without_leaks(parse_feedback(reply), example)
    assert shown.guideline == "Sort the dates first. Then count."
    truncated = '{"reason": "Misread the order.", "guideline": "Sort the dates first. Sort the dates'
    assert parse_feedback(truncated).guideline == "Sort the dates first."
    assert parse_feedback(truncated).parsed
