"""Run directories (identity check, append-and-fsync JSONL, torn-line repair) and resumable ``run_eval``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from runtime.data.records import RUN_CONFIG_VERSION, Episode, ItemResult, Record, RunConfig
from runtime.data.rundir import RunDir
from runtime.data.tasks import Example
from runtime.errors import ConfigError, DataError
from runtime.models.backend import Backend, Generation, GenerationSettings, Message, Usage
from runtime.report import render_evaluation
from runtime.workflows.evaluation import RESULTS, run_eval, summarize

IDENTITY = {"command": "eval", "task": "bbq", "limit": 6, "model_id": "tiny"}
GOLDEN = Path(__file__).parent / "golden"


class Row(Record):
    """A record of a test's own: an id, and whatever else a test writes."""

    reply: str | None = None
    n: int | None = None
    nested: dict[str, list[int]] | None = None

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude_none=True)


SETTINGS = GenerationSettings(max_new_tokens=16)


def examples(n: int = 6) -> list[Example]:
    """Choice items whose gold letter cycles A, B, C."""
    options = ("red", "blue", "green")
    text = "Which colour?\nOptions:\n(A) red\n(B) blue\n(C) green"
    return [Example(f"toy/{i}", "toy", f"{text}\n#{i}", f"({'ABC'[i % 3]})", "choice", options) for i in range(n)]


class ScriptedStudent(Backend):
    """Always answers "(B)"; later items answer sooner, so results arrive out of input order."""

    kind = "scripted"
    model_id = "scripted-student"

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def generate(
        self,
        messages: Sequence[Message],
        settings: GenerationSettings = SETTINGS,
        adapter: str | None = None,
    ) -> Generation:
        number = int(messages[-1]["content"].rsplit("#", 1)[1])
        self.asked.append(f"toy/{number}")
        await asyncio.sleep(0.002 * (10 - number))
        return Generation("The answer is (B).", Usage(20, 5), finish_reason="stop")

    @property
    def supports_option_scoring(self) -> bool:
        return True

    async def score_options(
        self, messages: Sequence[Message], options: Sequence[str], adapter: str | None = None
    ) -> list[float]:
        self.asked.append("score")
        return [-3.0 if not o.startswith("(C)") else -0.5 for o in options]


# ---- RunDir ---------------------------------------------------------------------------------------------------


def test_identity_mismatch_names_the_change(tmp_path: Path) -> None:
    RunDir(tmp_path / "run", IDENTITY, {"note": "first"})
    with pytest.raises(ConfigError, match=r"limit: 6 -> 8.*another --out"):
        RunDir(tmp_path / "run", {**IDENTITY, "limit": 8})
    same = RunDir(tmp_path / "run", dict(IDENTITY), {"note": "second"})  # same identity resumes
    config = json.loads(same.file("config.json").read_text())
    assert config == {"version": RUN_CONFIG_VERSION, "identity": IDENTITY, "note": "second"}


def test_identity_survives_the_json_round_trip(tmp_path: Path) -> None:
    """An identity holding tuples (``GenerationSettings.to_dict()``) or paths must match itself on a re-run."""
    identity = {**IDENTITY, "settings": GenerationSettings(stop=("###",)).to_dict(), "adapter": tmp_path / "lora"}
    RunDir(tmp_path / "run", identity)
    RunDir(tmp_path / "run", identity)  # the same command again resumes
    with pytest.raises(ConfigError, match="settings"):
        RunDir(tmp_path / "run", {**identity, "settings": GenerationSettings(stop=("END",)).to_dict()})


def test_folder_without_recorded_identity_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no identity recorded"):
        RunDir(tmp_path / "run", IDENTITY)


def test_a_run_directory_of_an_older_redpen_is_named_not_a_key_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    config = tmp_path / "run" / "config.json"
    config.write_text(json.dumps({"identity": IDENTITY}))  # as redpen wrote it before configs had a version
    with pytest.raises(ConfigError, match=rf"{config} was written by an older redpen \(version 1.*re-run"):
        RunDir(tmp_path / "run", IDENTITY)
    with pytest.raises(ConfigError, match="written by an older redpen"):
        RunConfig.read(tmp_path / "run")


def test_a_foreign_config_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run", {"command": "gather", "task": "bbq"})  # written by a test, not by `redpen gather`
    with pytest.raises(DataError, match=rf"{run.file('config.json')} is not a config redpen writes \(identity"):
        RunConfig.read(run.path)
    with pytest.raises(DataError, match="is not a redpen run directory"):
        RunConfig.read(tmp_path / "nothing-here")


def test_append_and_records_round_trip(tmp_path: Path) -> None:
    run = RunDir(tmp_path, IDENTITY)
    assert run.records(RESULTS, Row) == [] and run.done_ids(RESULTS, Row) == set()
    rows = [Row(id="a", reply="héllo\nworld"), Row(id="b", n=2, nested={"x": [1, 2]})]
    for row in rows:
        run.append(RESULTS, row)
    assert run.records(RESULTS, Row) == rows
    assert run.done_ids(RESULTS, Row) == {"a", "b"}
    assert run.file(RESULTS).read_text(encoding="utf-8").count("\n") == 2  # one line per record


def test_torn_last_line_is_dropped_then_cut(tmp_path: Path) -> None:
    run = RunDir(tmp_path, IDENTITY)
    run.append(RESULTS, Row(id="a"))
    run.append(RESULTS, Row(id="b"))
    with run.file(RESULTS).open("a") as f:
        f.write('{"id": "c", "rep')  # the process died mid-write
    assert run.records(RESULTS, Row) == [Row(id="a"), Row(id="b")]
    assert run.done_ids(RESULTS, Row) == {"a", "b"}

    run.repair(RESULTS)
    assert run.file(RESULTS).read_text() == '{"id": "a"}\n{"id": "b"}\n'
    run.append(RESULTS, Row(id="c"))
    assert run.done_ids(RESULTS, Row) == {"a", "b", "c"}
    run.repair(RESULTS)  # nothing torn: a no-op
    assert len(run.records(RESULTS, Row)) == 3


def test_torn_multibyte_character_is_a_torn_line(tmp_path: Path) -> None:
    """Records are written with ensure_ascii=False, so a kill can cut a UTF-8 character in half."""
    run = RunDir(tmp_path, IDENTITY)
    run.append(RESULTS, Row(id="a", reply="café"))
    with run.file(RESULTS).open("ab") as f:
        f.write(b'{"id": "b", "reply": "caf' + "é".encode()[:1])
    assert run.records(RESULTS, Row) == [Row(id="a", reply="café")]
    assert run.done_ids(RESULTS, Row) == {"a"}
    run.repair(RESULTS)
    assert run.records(RESULTS, Row) == [Row(id="a", reply="café")]


def test_unicode_line_separators_inside_a_reply_round_trip(tmp_path: Path) -> None:
    """U+2028, U+2029 and U+0085 are left raw by json.dumps(ensure_ascii=False); they are not line ends."""
    run = RunDir(tmp_path, IDENTITY)
    rows = [Row(id="a", reply="one\u2028two"), Row(id="b", reply="x\x85y\u2029z"), Row(id="c", reply="ok")]
    for row in rows:
        run.append(RESULTS, row)
    assert run.records(RESULTS, Row) == rows
    assert run.done_ids(RESULTS, Row) == {"a", "b", "c"}


def test_malformed_middle_line_names_file_and_line(tmp_path: Path) -> None:
    run = RunDir(tmp_path, IDENTITY)
    run.file(RESULTS).write_text('{"id": "a"}\n{"id": oops}\n{"id": "c"}\n')
    with pytest.raises(DataError, match=rf"{RESULTS}:2: not valid JSON"):
        run.records(RESULTS, Row)
    with pytest.raises(DataError, match=rf"{RESULTS}:2"):
        run.done_ids(RESULTS, Row)


def test_a_line_that_is_not_the_record_type_names_file_line_and_field(tmp_path: Path) -> None:
    run = RunDir(tmp_path, IDENTITY)
    run.file(RESULTS).write_text('{"id": "a"}\n{"verdict": "correct"}\n{"id": "c"}\n')
    with pytest.raises(DataError, match=rf"{RESULTS}:2: the line is no Row \(id: Field required\)"):
        run.records(RESULTS, Row)
    run.file(RESULTS).write_text('{"id": "a", "verdict": "maybe"}\n')
    with pytest.raises(DataError, match=rf"{RESULTS}:1: the line is no ItemResult \(source: Field required"):
        run.done_ids(RESULTS, ItemResult)


@pytest.mark.parametrize(("name", "model"), [("results", ItemResult), ("episodes", Episode)])
def test_records_written_before_the_read_back_was_typed_still_resume(
    name: str, model: type[Record], tmp_path: Path
) -> None:
    """Lines as the previous redpen wrote them (tests/golden/*_written_before.jsonl) read back typed, and are
    written again byte for byte."""
    lines = (GOLDEN / f"{name}_written_before.jsonl").read_text(encoding="utf-8")
    run = RunDir(tmp_path, IDENTITY)
    run.file(f"{name}.jsonl").write_text(lines, encoding="utf-8")
    records = run.records(f"{name}.jsonl", model)
    assert all(type(r) is model for r in records) and run.done_ids(f"{name}.jsonl", model) == {r.id for r in records}
    for record in records:
        run.append("again.jsonl", record)
    assert run.file("again.jsonl").read_text(encoding="utf-8") == lines


def test_whole_files_are_written_atomically(tmp_path: Path) -> None:
    run = RunDir(tmp_path, IDENTITY)
    run.write_json("metrics.json", {"accuracy": 0.5})
    run.write_json("metrics.json", {"accuracy": 0.75})
    run.write_text("report.md", "# report\n")
    assert json.loads(run.file("metrics.json").read_text()) == {"accuracy": 0.75}
    assert run.file("report.md").read_text() == "# report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock", "config.json", "metrics.json", "report.md"]


# ---- run_eval -------------------------------------------------------------------------------------------------


async def test_run_eval_resumes_only_the_missing_items(tmp_path: Path) -> None:
    items = examples(6)
    first = ScriptedStudent()
    results = await run_eval(items, first, RunDir(tmp_path, IDENTITY), SETTINGS, concurrency=6)
    assert [r.id for r in results] == [e.id for e in items]
    assert sorted(first.asked) == sorted(e.id for e in items)
    assert [r.verdict for r in results] == ["wrong", "correct", "wrong"] * 2
    assert all(r.predicted == "(B)" and r.mode == "generate" for r in results)
    on_disk = [json.loads(line)["id"] for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert on_disk != [e.id for e in items]  # appended as they finished, which is not input order

    # Keep two records (as if killed) plus a torn third line.
    lines = (tmp_path / RESULTS).read_text().splitlines(keepends=True)
    kept = [json.loads(line)["id"] for line in lines[:2]]
    (tmp_path / RESULTS).write_text("".join(lines[:2]) + lines[2][:15])

    second = ScriptedStudent()
    seen: list[str] = []
    resumed = await run_eval(items, second, RunDir(tmp_path, IDENTITY), SETTINGS, on_result=lambda r: seen.append(r.id))
    assert sorted(second.asked) == sorted(e.id for e in items if e.id not in kept)
    assert sorted(seen) == sorted(second.asked)
    assert [r.id for r in resumed] == [e.id for e in items]
    assert [r.verdict for r in resumed] == [r.verdict for r in results]
    assert len((tmp_path / RESULTS).read_text().splitlines()) == 6

    third = ScriptedStudent()
    again = await run_eval(items, third, RunDir(tmp_path, IDENTITY), SETTINGS)
    assert third.asked == [] and again == resumed


async def test_run_eval_returns_only_the_asked_items(tmp_path: Path) -> None:
    run = RunDir(tmp_path, IDENTITY)
    await run_eval(examples(6), ScriptedStudent(), run, SETTINGS)
    subset = examples(6)[3:5]
    results = await run_eval(subset, ScriptedStudent(), run, SETTINGS)
    assert [r.id for r in results] == ["toy/3", "toy/4"]


async def test_run_eval_loglik_mode_and_summary(tmp_path: Path) -> None:
    backend = ScriptedStudent()
    results = await run_eval(examples(6), backend, RunDir(tmp_path, IDENTITY), SETTINGS, mode="loglik")
    assert backend.asked == ["score"] * 6
    assert {r.mode for r in results} == {"loglik"}
    assert {r.predicted for r in results} == {"(C)"}
    assert all(r.scores == [-3.0, -3.0, -0.5] for r in results)

    metrics = summarize(results)
    overall = metrics.overall
    assert (overall.n, overall.correct, overall.wrong, overall.no_answer) == (6, 2, 4, 0)
    assert overall.chance == pytest.approx(1 / 3, abs=1e-4)
    assert metrics.modes == {"loglik": 6}
    report = render_evaluation("toy eval", IDENTITY, metrics).markdown()
    assert report.startswith("# toy eval\n")
    assert "| **all** | 6 | 0.333 |" in report
