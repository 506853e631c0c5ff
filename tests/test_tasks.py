import doctest
import json
from collections import Counter
from pathlib import Path

import pytest

from runtime.data import tasks
from runtime.data.kinds import parse_options
from runtime.data.tasks import Example, load_jsonl, load_task, task_names
from runtime.errors import ConfigError, DataError


def _split(data_dir: Path, name: str) -> dict:
    return json.loads((data_dir / "splits" / name).read_text())


@pytest.mark.parametrize(
    ("name", "split", "count", "sources"),
    [
        ("bbq", "examine", 11 * 50, 11),
        ("bbq", "gather", 11 * 200, 11),
        ("bbq/Age", "all", 250, 1),
        ("bbh/date_understanding", "gather", 200, 1),
        ("bbh/date_understanding", "examine", 50, 1),
        ("bbh/causal_judgement", "gather", 149, 1),
        ("bbh", "all", 6511, 27),
        ("gsm8k", "examine", 1319, 1),
        ("gsm8k", "gather", 7473, 1),
        ("mmlu/anatomy", "all", 135, 1),
        ("arc_challenge", "all", 1172, 1),
    ],
)
def test_split_counts(data_dir: Path, name: str, split: str, count: int, sources: int) -> None:
    examples = load_task(name, split, data_dir)
    assert len(examples) == count
    assert len({ex.source for ex in examples}) == sources
    assert len({ex.id for ex in examples}) == count


def test_salam16_is_the_split_files_sixteen_choice_tasks(data_dir: Path) -> None:
    examples = load_task("bbh/salam16", "examine", data_dir)
    sources = list(dict.fromkeys(ex.source for ex in examples))
    assert sources == [f"bbh/{t}" for t in _split(data_dir, "bbh_salam_80_20.json")["salam16"]]
    assert len(sources) == 16
    kinds = Counter(ex.answer_kind for ex in examples)
    assert kinds["choice"] >= len(examples) - 3  # movie_recommendation and ruin_names hold 3 broken rows
    assert set(kinds) <= {"choice", "text"}


def test_gather_and_examine_never_share_rows(data_dir: Path) -> None:
    for name in ("bbh", "bbq", "mmlu", "arc"):
        gather = {ex.id for ex in load_task(name, "gather", data_dir)}
        examine = {ex.id for ex in load_task(name, "examine", data_dir)}
        assert gather.isdisjoint(examine)
        assert len(gather | examine) == len(load_task(name, "all", data_dir))


def test_mmlu_and_arc_follow_the_split_files(data_dir: Path) -> None:
    plan = _split(data_dir, "mmlu_per_subject_80_20.json")["subjects"]
    assert len(load_task("mmlu", "examine", data_dir)) == sum(len(s["exam_idx"]) for s in plan.values())
    gather = load_task("mmlu/anatomy", "gather", data_dir)
    assert [ex.id for ex in gather] == [f"mmlu/anatomy/{i}" for i in plan["anatomy"]["gather_idx"]]
    arc = _split(data_dir, "arc_challenge_80_20.json")
    assert {ex.id for ex in load_task("arc", "gather", data_dir)} == {f"arc/{i}" for i in arc["gather_id"]}
    assert len(load_task("arc_challenge", "examine", data_dir)) == len(arc["exam_id"])


def test_bbq_example_shape_and_split_order(data_dir: Path) -> None:
    examples = load_task("bbq/Age", "gather", data_dir)
    plan = _split(data_dir, "bbq_sm_salam_80_20.json")["categories"]["Age"]
    assert [ex.metadata["example_id"] for ex in examples] == plan["gather_example_id"]
    first = examples[0]
    assert first.id == "bbq/Age/1776"
    assert first.source == "bbq/Age"
    assert first.answer_kind == "choice"
    assert first.options == ("Cannot answer", "The twenty-something", "The older adult")
    assert first.target == "(A)"
    assert first.metadata["category"] == "Age"


def test_bbh_answer_kinds(data_dir: Path) -> None:
    date = load_task("bbh/date_understanding", "examine", data_dir)[3]
    assert date.id == "bbh/date_understanding/203"
    assert date.answer_kind == "choice"
    assert len(date.options) == 6 and date.target in {f"({c})" for c in "ABCDEF"}
    assert "Options:\n(A) " in date.input
    kinds = {
        name: {ex.answer_kind for ex in load_task(f"bbh/{name}", "all", data_dir)}
        for name in ("object_counting", "multistep_arithmetic_two", "formal_fallacies", "word_sorting", "navigate")
    }
    assert kinds == {
        "object_counting": {"number"},
        "multistep_arithmetic_two": {"number"},
        "formal_fallacies": {"text"},
        "word_sorting": {"text"},
        "navigate": {"text"},
    }
    broken = load_task("bbh/movie_recommendation", "all", data_dir)[163]
    assert (broken.answer_kind, broken.target, broken.options) == ("text", "Monsters, Inc", ())


def test_gsm8k_target_and_solution(data_dir: Path) -> None:
    first = load_task("gsm8k", "examine", data_dir)[0]
    assert (first.id, first.source, first.target, first.answer_kind) == ("gsm8k/test/0", "gsm8k", "18", "number")
    assert first.metadata["solution"].endswith("#### 18")
    assert all("," not in ex.target for ex in load_task("gsm8k", "all", data_dir))


def test_mmlu_and_arc_build_the_options_block(data_dir: Path) -> None:
    anatomy = load_task("mmlu/anatomy", "all", data_dir)[2]
    assert anatomy.id == "mmlu/anatomy/2"
    assert anatomy.input.endswith("Options:\n(A) Bladder\n(B) Kidney\n(C) Ureter\n(D) Urethra")
    assert (anatomy.target, anatomy.options) == ("(A)", ("Bladder", "Kidney", "Ureter", "Urethra"))
    arc = load_task("arc", "all", data_dir)[0]
    assert (arc.id, arc.source, arc.target) == ("arc/Mercury_7175875", "arc_challenge", "(C)")
    assert parse_options(arc.input) == arc.options


@pytest.mark.parametrize(
    ("name", "limit", "per_source"),
    [("bbq", 110, 10), ("bbh/salam16", 160, 10), ("bbq", 11, 1), ("bbq/Age", 7, 7)],
)
def test_limit_is_round_robin_across_sources(data_dir: Path, name: str, limit: int, per_source: int) -> None:
    examples = load_task(name, "gather", data_dir, limit=limit)
    assert len(examples) == limit
    assert set(Counter(ex.source for ex in examples).values()) == {per_source}
    full = load_task(name, "gather", data_dir)
    by_source = {src: [ex for ex in full if ex.source == src] for src in dict.fromkeys(ex.source for ex in full)}
    for src, items in by_source.items():  # each source keeps its own order: the first k of it
        taken = [ex for ex in examples if ex.source == src]
        assert taken == items[: len(taken)]


def test_uneven_limit_and_limit_above_total(data_dir: Path) -> None:
    counts = Counter(ex.source for ex in load_task("bbq", "examine", data_dir, limit=13))
    assert sorted(counts.values()) == [1] * 9 + [2] * 2
    assert counts["bbq/Age"] == 2  # sources in sorted order: the first ones get the extra
    assert load_task("bbq", "examine", data_dir, limit=10_000) == load_task("bbq", "examine", data_dir)


def test_task_names(data_dir: Path) -> None:
    names = task_names(data_dir)
    assert {"bbh", "bbh/salam16", "bbh/date_understanding", "bbq/Age", "gsm8k", "mmlu/anatomy", "arc"} <= set(names)
    assert len([n for n in names if n.startswith("bbh/")]) == 27 + 1
    assert len([n for n in names if n.startswith("bbq/")]) == 11
    assert len([n for n in names if n.startswith("mmlu/")]) == 57
    assert set(task_names()) <= set(names)


def test_example_round_trips_through_dict(data_dir: Path) -> None:
    ex = load_task("bbq/Age", "examine", data_dir)[0]
    again = Example.from_dict(json.loads(json.dumps(ex.to_dict())))
    assert again == ex
    assert hash(again) == hash(ex)


def test_unknown_task_suggests_close_names(data_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"bbh/date_understanding.*redpen tasks"):
        load_task("bbh/date_understandin", "gather", data_dir)
    with pytest.raises(ConfigError, match=r"did you mean.*gsm8k"):
        load_task("gsm8", "gather", data_dir)
    with pytest.raises(ConfigError, match="unknown task"):
        load_task("bbq/age", "gather", data_dir)


def test_bad_arguments(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--data-dir.*REDPEN_DATA_DIR"):
        load_task("bbq", "gather", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="split"):
        load_task("bbq", "train", data_dir)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="limit"):
        load_task("bbq", "gather", data_dir, limit=0)
    with pytest.raises(DataError, match=r"missing folder .*bbh"):
        load_task("bbh", "gather", tmp_path)


# --- bring your own JSONL ---


def _write(tmp_path: Path, lines: list[str], name: str = "file.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl_choice(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"input": "Pick one.\nOptions:\n(A) red\n(B) blue", "target": "B", "topic": "colour"}),
            "",
            json.dumps({"input": "Pick again.\nOptions:\n(A) cat\n(B) dog\n(C) eel", "target": "(C)"}),
        ],
    )
    first, second = load_jsonl(path, "choice")
    assert (first.id, first.source, first.target, first.options) == ("file/1", "file", "(B)", ("red", "blue"))
    assert first.metadata == {"topic": "colour"}
    assert (second.id, second.target, second.options) == ("file/3", "(C)", ("cat", "dog", "eel"))
    assert [ex.id for ex in load_jsonl(path, "choice", source="mine", limit=1)] == ["mine/1"]


def test_load_jsonl_number_and_text(tmp_path: Path) -> None:
    rows = [{"input": "2 + 2?", "target": 4}, {"input": "x", "target": "1,000"}]
    path = _write(tmp_path, [json.dumps(row) for row in rows])
    assert [ex.target for ex in load_jsonl(path, "number")] == ["4", "1000"]
    path = _write(tmp_path, [json.dumps({"input": "Sort: b a", "target": "a b"})], "words.jsonl")
    assert load_jsonl(path, "text")[0].target == "a b"


@pytest.mark.parametrize(
    ("line", "kind", "message"),
    [
        ('{"input": "q", "target": ', "text", "not valid JSON"),
        ('{"target": "x"}', "text", "missing field 'input'"),
        ('{"input": "q"}', "text", "missing field 'target'"),
        ('{"input": "q", "target": "  "}', "text", "empty 'target'"),
        ('{"input": "", "target": "x"}', "text", "'input' must be a non-empty string"),
        ('["input", "target"]', "text", "expected a JSON object"),
        ('{"input": "q", "target": "eighteen"}', "number", "must be a number"),
        ('{"input": "q", "target": "blue"}', "choice", "must be a letter"),
        ('{"input": "q\\nOptions:\\n(A) x\\n(B) y", "target": "(D)"}', "choice", "not one of the 2 options"),
    ],
)
def test_load_jsonl_names_file_and_line(tmp_path: Path, line: str, kind: str, message: str) -> None:
    good = json.dumps({"input": "q\nOptions:\n(A) x\n(B) y", "target": "(A)" if kind == "choice" else "1"})
    path = _write(tmp_path, [good, good, line, good])
    with pytest.raises(DataError, match="file.jsonl:3") as err:
        load_jsonl(path, kind, limit=1)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_load_jsonl_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing file") as missing:
        load_jsonl(tmp_path / "absent.jsonl", "text")
    assert "data folder" not in str(missing.value)  # the user's own file: no hint about the benchmark folder
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(_write(tmp_path, [""]), "text")
    with pytest.raises(ConfigError, match="answer kind"):
        load_jsonl(_write(tmp_path, ['{"input": "q", "target": "a"}']), "words")  # type: ignore[arg-type]


def test_doctests() -> None:
    assert doctest.testmod(tasks).failed == 0
