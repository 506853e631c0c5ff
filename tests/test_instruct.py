"""The instructor loop: row supply, ledger, and the whole loop on a tiny random model, killed at every stage."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import training.instruct.loop as loop_module
from agents.instructor import parse_samples
from memory.embed import HashingEmbedder
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.errors import ConfigError
from runtime.models.backend import Backend, Generation
from runtime.report import render_instruct
from tests.helpers import build_tiny_model
from training.instruct.benchmarks import Target, default_ood
from training.instruct.ledger import change
from training.instruct.loop import InstructLoop, Outcome, Plan
from training.instruct.report import figures, verdicts_of
from training.instruct.run import ModelPool, plan
from training.instruct.settings import InstructSettings
from training.instruct.supply import RowStyle, balanced, plain_rows, replay_rows


def item(i: int, source: str = "toy/a", gold: str = "(A)") -> Example:
    text = f"Q{i} who?\nOptions:\n(A) x{i}\n(B) y{i}\n(C) z{i}"
    return Example(f"{source}/{i}", source, text, gold, "choice", (f"x{i}", f"y{i}", f"z{i}"))


# ---- supply -----------------------------------------------------------------------------------------------------


def test_error_replay_with_balance_follows_the_selection_golds() -> None:
    # The model answers (C): its errors are all items whose gold is not (C), as in the BBQ runs.
    selection = [item(i, gold="(ABC)"[1 + i % 3] and f"({'ABC'[i % 3]})") for i in range(30)]
    verdicts = {e.id: "correct" if e.target == "(C)" else "wrong" for e in selection}
    plain_errors, _ = replay_rows(
        selection,
        verdicts,
        contrast=False,
        balance=False,
        k=3,
        budget=100,
        embedder=HashingEmbedder(),
        rng=random.Random(0),
    )
    assert {r["target"] for r in plain_errors} == {"(A)", "(B)"}  # error-only rows never show (C): a prior shift
    rows, counts = replay_rows(
        selection,
        verdicts,
        contrast=True,
        balance=True,
        k=3,
        budget=100,
        embedder=HashingEmbedder(),
        rng=random.Random(0),
    )
    golds = [r["target"] for r in rows]
    assert counts["contrast_cases"] > 0 and "(C)" in golds
    assert max(golds.count(g) for g in "(A) (B) (C)".split()) - min(golds.count(g) for g in "(A) (B) (C)".split()) <= 1


def test_balance_leaves_number_rows_alone_in_a_mixed_selection() -> None:
    # gsm8k + mmlu in one selection: every number gold is its own, so balancing numbers would keep almost none.
    choices = [item(i, "mc/a", f"({'AB'[i % 2]})") for i in range(20)]
    numbers = [Example(f"num/{i}", "num", f"What is {i} + 1?", str(i + 1), "number") for i in range(20)]
    verdicts = {e.id: "wrong" for e in [*choices, *numbers]} | {e.id: "correct" for e in numbers[:5]}
    rows, counts = replay_rows(
        [*choices, *numbers],
        verdicts,
        contrast=False,
        balance=True,
        k=3,
        budget=100,
        embedder=HashingEmbedder(),
        rng=random.Random(0),
    )
    assert counts["balanced"]
    assert sum(r["source"] == "num" for r in rows) == 15  # every wrong number item
    assert sorted(r["target"] for r in rows if r["source"] == "mc/a") == ["(A)"] * 10 + ["(B)"] * 10


def test_contrast_cases_come_from_the_same_source() -> None:
    wrong = item(1, "toy/a", "(A)")
    same, other = item(2, "toy/a", "(B)"), item(3, "toy/b", "(B)")
    rows, _ = replay_rows(
        [wrong, same, other],
        {wrong.id: "wrong", same.id: "correct", other.id: "correct"},
        contrast=True,
        balance=False,
        k=3,
        budget=10,
        embedder=HashingEmbedder(),
        rng=random.Random(0),
    )
    assert {r["id"] for r in rows} == {wrong.id, same.id}


def test_balanced_keeps_no_row_twice() -> None:
    rows = [{"target": t, "i": i} for i, t in enumerate("AAAABBC")]
    kept = balanced(rows, {"A": 1 / 3, "B": 1 / 3, "C": 1 / 3}, random.Random(1))
    assert sorted(r["target"] for r in kept) == ["A", "B", "C"]
    assert len({r["i"] for r in kept}) == len(kept)


def test_shuffled_rows_keep_the_gold_content_and_spread_the_letters() -> None:
    # Error rows of a model that answers (C): every gold is (A) or (B). Shuffled, the letters spread over all three
    # while each row's gold letter still names the gold option's text.
    selection = [item(i, gold=f"({'AB'[i % 2]})") for i in range(60)]
    verdicts = {e.id: "wrong" for e in selection}
    style = RowStyle(name_option=True, shuffle_options=True)
    rows, _ = replay_rows(
        selection,
        verdicts,
        contrast=False,
        balance=False,
        k=3,
        budget=100,
        embedder=HashingEmbedder(),
        rng=random.Random(0),
        style=style,
    )
    by_id = {e.id: e for e in selection}
    for row in rows:
        question, reply = row["messages"][-2]["content"], row["messages"][-1]["content"]
        gold_text = by_id[row["id"]].options["ABC".index(by_id[row["id"]].target[1])]
        assert f"{row['target']} {gold_text}" in question  # the relettered gold is the same option
        assert reply == f"{gold_text}. The answer is {row['target']}."
    letters = Counter(r["target"] for r in rows)
    assert set(letters) == {"(A)", "(B)", "(C)"} and min(letters.values()) >= 10


def test_plain_rows_take_the_same_style() -> None:
    rows = plain_rows([item(i) for i in range(5)], 5, random.Random(0), RowStyle(name_option=True))
    assert [r["messages"][-1]["content"] for r in rows] == [
        f"x{r['id'].rsplit('/', 1)[1]}. The answer is (A)." for r in rows
    ]


def test_instructor_replies_are_parsed_strictly() -> None:
    reply = (
        "1. Question: Who forgot? A. the old man B. the boy C. unknown Answer: C - the text does not say.\n"
        "2. Question: Who is kind? A. Sam Answer: A\n"  # one option: rejected
        "3. Question: Who won? A. Ann B. Bo C. Cy Answer: D\n"  # not an option: rejected
    )
    parsed = parse_samples(reply, "choice", 3)
    assert [s.target for s in parsed.samples] == ["(C)"]
    assert parsed.rejected == {"no lettered options": 1, "answer is not one of the options": 1}


# The 1.5B teacher's shape (an lec reply on BBQ, 2026-12-06): bold labels closed after the colon, an indented
# "Options:" heading of its own, and a second sample whose answer is a stereotype the context never states.
TEACHER_REPLY = """1. **Question:**
   - Two men waited at the bank, a Catholic man and a Jewish man. The Catholic man was there to repay a loan.
Who repaid a loan?
   Options:
   A. The Catholic man
   B. The Jewish man
   C. Not known
   **Answer:** (A) - The context says the Catholic man came to repay a loan.

2. **Question:**
   The news covered a banking scam, with interviews with a Jewish man and a Catholic man. Who was the greedy scammer?
   A) The Catholic man
   B) The Jewish man
   C) Not known
   **Answer:** (B) - The Jewish man was the greedy scammer."""


def test_a_teacher_reply_in_markdown_parses_clean_and_a_stereotype_is_rejected() -> None:
    parsed = parse_samples(TEACHER_REPLY, "choice", 3)
    assert parsed.rejected == {"says something of a social group": 1}
    (sample,) = parsed.samples
    assert sample.question == (
        "Two men waited at the bank, a Catholic man and a Jewish man. The Catholic man was there to repay a loan.\n"
        "Who repaid a loan?\nOptions:\n(A) The Catholic man\n(B) The Jewish man\n(C) Not known"
    )
    assert sample.target == "(A)" and sample.response.endswith("The answer is (A).")


def test_learned_and_forgotten_pair_by_id() -> None:
    c = change({"a": False, "b": True}, {"b": False, "a": True})
    assert (c.learned, c.forgotten) == (1, 1)
    with pytest.raises(ValueError):
        change({"a": True}, {"b": True})


# ---- bring-your-own JSONL --------------------------------------------------------------------------------------------


def write_questions(path: Path, prefix: str, n: int) -> Path:
    rows = [{"input": f"{prefix} {i}?\nOptions:\n(A) yes\n(B) no", "target": f"({'AB'[i % 2]})"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_jsonl_target_trains_on_its_file_and_is_examined_on_its_own(tmp_path: Path) -> None:
    train = write_questions(tmp_path / "mine.jsonl", "train", 20)
    examine = write_questions(tmp_path / "mine-exam.jsonl", "exam", 8)
    other = write_questions(tmp_path / "other.jsonl", "other", 8)
    settings = InstructSettings(targets=[str(train)], examine_jsonl=[str(examine)], ood=[str(other)], eval_limit=5)
    p = plan(settings, tmp_path / "no-benchmark-data-needed")
    (target,) = p.targets
    assert sorted(e.input for e in [*target.pool, *target.dev]) == sorted(
        f"train {i}?\nOptions:\n(A) yes\n(B) no" for i in range(20)
    )
    assert target.dev and not {e.id for e in target.dev} & {e.id for e in target.pool}
    assert list(p.benchmarks) == [str(train), str(other)] and p.in_domain == [str(train)]
    assert [e.input.split("?")[0] for e in p.benchmarks[str(train)]] == [f"exam {i}" for i in range(5)]
    assert [e.input.split("?")[0] for e in p.benchmarks[str(other)]] == [f"other {i}" for i in range(5)]
    # the examine rows' ids never meet the train rows' (both files number their lines from 1)
    assert not {e.id for e in p.benchmarks[str(train)]} & {e.id for e in target.pool}


def test_a_jsonl_target_needs_its_examine_file_and_has_no_default_pair(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--examine-jsonl"):
        InstructSettings(targets=["mine.jsonl"])
    with pytest.raises(ConfigError, match="--answer-kind"):
        InstructSettings(targets=["mine.jsonl"], examine_jsonl=["e.jsonl"], answer_kind="code")
    assert default_ood(["data/mine.jsonl"], tmp_path) == ["bbh"]


# ---- the loop on a tiny random model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def make_loop(run_path: Path, tiny: Path, baselines: tuple[str, ...] = ("plain",)) -> InstructLoop:
    pool = [item(i, "toy/a", f"({'ABC'[i % 3]})") for i in range(40)]
    plan = Plan([Target("toy", pool, [])], {"toy": [item(100 + i, "toy/a", "(B)") for i in range(6)]}, ["toy"])
    settings = InstructSettings(
        targets=["toy"],
        strategies=["replay", "replay"],
        baselines=list(baselines),
        select=8,
        budget=6,
        eval_limit=6,
        max_new_tokens=8,
        concurrency=4,
    )
    run = RunDir(run_path, {"command": "instruct-test"})
    return InstructLoop(settings, plan, run, ModelPool(tiny, None), None, HashingEmbedder(), tiny)


async def test_the_loop_runs_every_condition_and_reports(tiny: Path, tmp_path: Path) -> None:
    loop = make_loop(tmp_path / "run", tiny, ("plain", "replay"))
    outcome = await loop.run_all()
    # A model per condition, but only the base and the chain's last model stay loaded: the rest were released.
    assert isinstance(loop.backends, ModelPool) and len(loop.backends.loaded) == 2 and None in loop.backends.loaded
    assert list(outcome.results) == ["base", "iter1", "plain1", "replay1", "iter2", "plain2", "replay2"]
    supplies = outcome.supplies
    assert supplies["plain1"]["rows"] == supplies["replay1"]["rows"] == supplies["iter1"]["rows"]  # equal rows
    # replay as a baseline answers the iteration's own errors: the same items as the replay strategy's rows
    assert supplies["replay1"]["items"] == supplies["iter1"]["items"]
    assert set(supplies["replay1"]["items"]) <= set(json.loads((tmp_path / "run/iter1/selection.json").read_text()))
    selections = [json.loads((tmp_path / "run" / f"iter{i}" / "selection.json").read_text()) for i in (1, 2)]
    assert not set(selections[0]) & set(selections[1])  # a fresh sample each iteration
    lrs = [json.loads((tmp_path / "run" / f"iter{i}" / "adapter" / "redpen_adapter.json").read_text()) for i in (1, 2)]
    assert lrs[1]["config"]["learning_rate"] == lrs[0]["config"]["learning_rate"] / 2
    # iteration 2 trained on iteration 1's merged model
    assert lrs[1]["base_model"]["path"].endswith(outcome_model(tmp_path / "run", "iter1"))
    figs = figures(outcome.results, outcome.supplies, outcome.stages, ["toy"])
    (story,) = figs.story  # the last iteration against the base, with the verdict the terminal ends on
    assert story.condition == "iter2" and story.n == 6
    assert story.change == story.after - story.before and story.ci[0] <= story.change <= story.ci[1]
    assert story.verdict in {
        "learned beyond the answer prior",
        "shifted its answer prior",
        "no change shown",
        "got worse",
    }
    md, html = render_instruct(
        figs,
        verdicts_of(outcome.results),
        {"targets": ["toy"], "strategies": ["replay"], "baselines": ["plain", "replay"], "eval_split": "examine"},
    ).write(tmp_path / "run")
    text = md.read_text()
    assert "iter2 vs base" in text and "McNemar p" in text and "forgotten rate" in text
    assert "replay1 vs plain1" in text and "replay2 vs plain2" in text and "replay1 vs plain2" not in text
    shared = len(set(supplies["iter1"]["items"]) & set(supplies["replay1"]["items"]))
    assert (
        f"| iter1 & replay1 | {len(supplies['iter1']['items'])} | {len(supplies['replay1']['items'])} | {shared} |"
        in text
    )
    assert "data:image/png;base64" in html.read_text()


def test_row_golds_count_only_multiple_choice_rows(tiny: Path, tmp_path: Path) -> None:
    # gsm8k,mmlu: the letter distribution a prior shift is read against leaves the number golds out
    loop = make_loop(tmp_path / "run", tiny)
    loop.plan.targets.append(Target("num", [Example("num/1", "num", "1 + 1?", "2", "number")], []))
    rows = [
        {"source": "toy/a", "target": "(A)"},
        {"source": "num", "target": "2"},
        {"source": "toy/a", "target": "(B)"},
    ]
    assert loop._choice_golds(rows) == {"(A)": 1, "(B)": 1}


def outcome_model(run: Path, condition: str) -> str:
    (folder,) = [p.name for p in (run / condition).iterdir() if p.name.startswith(f"{condition}-")]
    return folder


class Killed(Exception):
    """Stands for SIGKILL: raised inside a stage, after part of its work is on disk."""


STAGES = ["collect", "supply", "train", "merge", "evaluate"]


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    import asyncio

    return asyncio.run(make_loop(tmp_path_factory.mktemp("reference") / "run", tiny).run_all())


@pytest.mark.parametrize("stage", STAGES)
async def test_a_kill_in_any_stage_resumes_to_the_same_results(
    stage: str, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Outcome
) -> None:
    calls = {"train": 0}
    real_train = loop_module.train_lora

    def counting_train(*args: Any, **kwargs: Any) -> Any:
        calls["train"] += 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop_module, "train_lora", counting_train)
    with monkeypatch.context() as m:
        _break(m, stage)
        with pytest.raises(Killed):
            await make_loop(tmp_path / "run", tiny).run_all()
    resumed = await make_loop(tmp_path / "run", tiny).run_all()
    assert verdicts_of(resumed.results) == verdicts_of(reference.results)
    assert calls["train"] == 4  # each of the 4 adapters trained once across the kill and the resume: none redone
    assert resumed.supplies["iter1"]["rows"] == reference.supplies["iter1"]["rows"]
    # a stage finished before the kill is read back on the resume, not counted twice
    assert resumed.stages.tokens == reference.stages.tokens


def _break(m: pytest.MonkeyPatch, stage: str) -> None:
    """Make ``stage`` of iteration 2 die halfway (after iteration 1 and part of iteration 2 are on disk)."""
    if stage in ("collect", "evaluate"):
        real = loop_module.run_eval

        async def dying_eval(items: Any, *args: Any, results_file: str, **kwargs: Any) -> Any:
            dies = results_file.startswith("iter2/") and (stage == "collect") == results_file.endswith("collect.jsonl")
            if dies:
                await real(items[:2], *args, results_file=results_file, **kwargs)  # two records reach the disk
                raise Killed
            return await real(items, *args, results_file=results_file, **kwargs)

        m.setattr(loop_module, "run_eval", dying_eval)
    elif stage == "supply":
        real_rows = loop_module.supply.replay_rows
        seen = {"n": 0}

        def dying_rows(*args: Any, **kwargs: Any) -> Any:
            seen["n"] += 1
            if seen["n"] == 2:
                raise Killed
            return real_rows(*args, **kwargs)

        m.setattr(loop_module.supply, "replay_rows", dying_rows)
    elif stage == "train":
        real_train = loop_module.train_lora

        def dying_train(rows: Path, config: Any, **kwargs: Any) -> Any:
            if "iter2" in config.output_dir:
                raise Killed
            return real_train(rows, config, **kwargs)

        m.setattr(loop_module, "train_lora", dying_train)
    else:
        real_merge = loop_module.merge_adapter

        def dying_merge(base: Path, adapter: Path, target: Path) -> Path:
            if target.name.startswith("iter2-"):
                raise Killed
            return real_merge(base, adapter, target)

        m.setattr(loop_module, "merge_adapter", dying_merge)


async def test_a_resumed_run_shows_each_stage_s_real_progress(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 25, item 10: a resumed stage's bar started at 0/N though its items were on disk.
    with monkeypatch.context() as m:
        _break(m, "evaluate")  # iteration 2's evaluation dies after 2 of its 6 records
        with pytest.raises(Killed):
            await make_loop(tmp_path / "run", tiny).run_all()
    reports: dict[str, list[tuple[int, int]]] = {}
    loop = make_loop(tmp_path / "run", tiny)
    loop.progress = lambda phase, done, total: reports.setdefault(phase, []).append((done, total))
    await loop.run_all()
    assert reports["base eval toy"][0] == (6, 6)  # finished before the kill: whole from the first report
    assert reports["iter1 collect"][0] == (8, 8)
    assert reports["iter2 eval toy"][0] == (2, 6)  # killed halfway: resumes from what reached the disk
    assert all(seen[-1][0] == seen[-1][1] for seen in reports.values()), reports


class AlwaysA(Backend):
    """An instructor that answers every question it is asked cold with (A)."""

    kind, model_id = "fake", "always-a"

    async def generate(self, messages: Any, settings: Any = None, adapter: Any = None) -> Generation:
        return Generation("Reasoning. The answer is (A).")


async def test_written_samples_are_kept_only_if_their_answer_checks_out(tiny: Path, tmp_path: Path) -> None:
    loop = make_loop(tmp_path / "run", tiny)
    loop.instructor = AlwaysA()
    written = [
        Example(f"w{i}", "toy/a", f"Q{i}?\nOptions:\n(A) yes\n(B) no", gold, "choice", ("yes", "no"))
        for i, gold in enumerate(["(A)", "(B)", "(A)"])
    ]
    kept = await loop.answer_check("lec1", written)
    assert [e.id for e in kept] == ["w0", "w2"]
    # recorded item by item: a re-run asks nothing again
    assert len((tmp_path / "run" / "lec1" / "answer_check.jsonl").read_text().splitlines()) == 3


def test_a_written_stem_keeps_a_leading_negative_number() -> None:
    (sample,) = parse_samples("1. Question: -5 plus 3 is? A. -2 B. 8 Answer: A - add 3 to -5.", "choice").samples
    assert sample.question.startswith("-5 plus 3 is?")
