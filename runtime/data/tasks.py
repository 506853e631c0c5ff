"""Benchmark items as ``Example`` rows: BBH, BBQ, GSM8K, MMLU, ARC-Challenge, MBPP, HumanEval, and bring-your-own
JSONL.

The data folder is read in place (its README describes it); splits come from ``splits/*.json`` so that mistakes
are gathered on one part of a benchmark and examined on another, never the same rows.

Each benchmark family is one entry of the task table, ``FAMILIES``: its loader, data, split file, answer kind,
sub-tasks, whether it is for evaluation only and its out-of-domain pair. Task names: ``bbh``, ``bbh/salam16``,
``bbh/<task>``, ``bbq``, ``bbq/<Category>``, ``gsm8k``, ``gsm_plus``, ``mmlu``, ``mmlu/<subject>``,
``arc_challenge`` (alias ``arc``), ``mbpp``, ``humaneval``. ``task_names(data_dir)`` lists them all.

Code items (MBPP, HumanEval) have the answer kind ``code``: their target is the canonical solution, and their
metadata holds what a program is built from, ``prefix + reply's code + tests`` (``runtime.data.graders``), and the
``entry_point`` the tests call.
"""

from __future__ import annotations

import ast
import csv
import difflib
import gzip
import io
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import ascii_uppercase
from typing import Any, Literal, get_args

from runtime.data.kinds import CHOICE, KINDS, NUMBER, TEXT, AnswerKind, jsonl_kinds, kind_named, parse_options
from runtime.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Split = Literal["gather", "examine", "all"]


@dataclass(frozen=True)
class Example:
    """One benchmark item; ``id`` is unique and stable across runs (e.g. ``bbh/date_understanding/203``)."""

    id: str
    source: str  # the source dataset or sub-task, e.g. "bbh/date_understanding", "bbq/Age", "gsm8k"
    input: str  # the prompt shown to the model; choice items include an "Options:\n(A) ..." block
    target: str  # gold: "(B)" for choice, "18" for number, the exact text for text
    answer_kind: str  # a key of runtime.data.kinds.KINDS: choice, number, text, code (kind_of(example) acts on it)
    options: tuple[str, ...] = ()  # choice items: option texts in letter order, without the "(A) " prefix
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)
    where: str = field(default="", compare=False)  # the file and line (or item) it was read from, for errors

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "options": list(self.options)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        return cls(**{**d, "options": tuple(d.get("options", ())), "metadata": dict(d.get("metadata", {}))})


@dataclass(frozen=True)
class Family:
    """A benchmark family, one entry of the task table ``FAMILIES``: all the code knows about it."""

    name: str
    # (family, sub-task or "", split, data folder) -> one list of examples per source, in source order
    load: Callable[[Family, str, Split, Path], list[list[Example]]]
    data: str  # where its data is under the data folder
    splits: str | None  # its split file under the data folder's splits/; None: the data's own files decide
    answer_kind: str | None  # the kind of all its items (runtime.data.kinds); None: by sub-task
    subtasks: str = ""  # the file name ending of a sub-task's file in ``data`` ("_test.csv": mmlu/<subject>)
    groups: tuple[str, ...] = ()  # named sets of sub-tasks, listed even without the data (bbh/salam16)
    eval_only: bool = False  # examined only, never gathered on or trained on
    ood: str | None = None  # a target's out-of-domain set, as the LLMs-as-Instructors paper pairs them
    ood_rest: bool = False  # a target of some sub-tasks has the family's other sub-tasks as its out-of-domain set
    ids: str = ""  # the prefix of its item ids, when it is not the name

    @property
    def kind(self) -> AnswerKind:
        """The kind of its items, for a family of one kind."""
        return kind_named(self.answer_kind or "")


def task_names(data_dir: Path | None = None) -> list[str]:
    """Every accepted task name; without a data folder only the families and their named groups (the sub-tasks are
    files)."""
    names = [*FAMILIES, *(f"{name}/{group}" for name, family in FAMILIES.items() for group in family.groups)]
    if data_dir is not None:
        data_dir = Path(data_dir)
        _require_data_dir(data_dir)
        for name, family in FAMILIES.items():
            if family.subtasks:
                files = (data_dir / family.data).glob(f"*{family.subtasks}")
                names += sorted(f"{name}/{p.name.removesuffix(family.subtasks)}" for p in files)
    return sorted(names)


def load_task(name: str, split: Split, data_dir: Path, limit: int | None = None) -> list[Example]:
    """Load one benchmark task's split; ``limit`` takes examples round-robin across its sources.

    Sources come in a fixed order (BBH tasks, BBQ categories and MMLU subjects sorted by name) and keep their
    file/split order; the result is grouped by source, so ``limit=None`` and a limit above the total agree.
    """
    if split not in get_args(Split):
        raise ConfigError(f"unknown split {split!r}; use one of: gather, examine, all")
    _check_limit(limit)
    family_name, _, sub = name.partition("/")
    family = FAMILIES.get(family_name)
    if family is None or name.endswith("/") or (sub and not family.subtasks):
        raise _unknown_task(name, task_names())
    if family.eval_only and split != "examine":
        raise ConfigError(f"{name} is for evaluation only: use the examine split, never gather or train on it")
    data_dir = Path(data_dir)
    _require_data_dir(data_dir)
    try:
        per_source = family.load(family, sub, split, data_dir)
    except KeyError as e:
        raise DataError(
            f"the {family_name} data under {data_dir} lacks the field {e}; see the data folder's README"
        ) from e
    examples = _round_robin(per_source, limit)
    logger.debug("loaded %s/%s: %d examples from %d sources", name, split, len(examples), len(per_source))
    return examples


def load_jsonl(path: Path, answer_kind: str, source: str | None = None, limit: int | None = None) -> list[Example]:
    """Bring your own benchmark: JSONL rows with ``input`` and ``target``; other fields go to metadata.

    The whole file is validated before anything is returned. Ids are ``<source>/<line number>``; ``source``
    defaults to the file stem. Choice targets may be ``B`` or ``(B)``; options come from ``(A) text`` lines.
    """
    if answer_kind not in jsonl_kinds():
        raise ConfigError(f"unknown answer kind {answer_kind!r}; use one of: {', '.join(jsonl_kinds())}")
    kind = KINDS[answer_kind]
    _check_limit(limit)
    path = Path(path)
    if not path.is_file():  # the user's own file, not the data folder's: say which, without the data-folder hint
        raise DataError(f"missing file {path}: no such JSONL file")
    source = source or path.stem
    examples = []
    for line_no, row in _read_jsonl(path):
        where = f"{path}:{line_no}"
        for key in ("input", "target"):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r} (each line needs 'input' and 'target')")
        text, target = row["input"], row["target"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'input' must be a non-empty string")
        if isinstance(target, bool) or not isinstance(target, str | int | float):
            raise DataError(f"{where}: 'target' must be a string or a number, got {type(target).__name__}")
        target = str(target).strip()
        if not target:
            raise DataError(f"{where}: empty 'target'")
        options = kind.options_of(text)
        target = kind.gold(target, options, where)
        metadata = {k: v for k, v in row.items() if k not in ("input", "target")}
        examples.append(Example(f"{source}/{line_no}", source, text, target, answer_kind, options, metadata, where))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples[:limit]


# --- benchmark loaders: each returns one list of examples per source, in source order ---

# BBH tasks whose targets are integers; every other BBH task without "(X)" options is graded as text.
BBH_NUMBER_TASKS = frozenset({"object_counting", "multistep_arithmetic_two"})


def _load_bbh(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    tasks_dir = data_dir / family.data
    if not tasks_dir.is_dir():
        raise DataError(f"missing folder {tasks_dir}; the data folder should hold {family.data}/<task>.json")
    plan = _read_json(_split_file(family, data_dir))
    if not sub:
        tasks = sorted(p.stem for p in tasks_dir.glob("*.json"))
    elif sub == "salam16":
        tasks = list(plan["salam16"])
    elif (tasks_dir / f"{sub}.json").is_file():
        tasks = [sub]
    else:
        raise _unknown_task(f"{family.name}/{sub}", task_names(data_dir))
    out = []
    for task in tasks:
        path = tasks_dir / f"{task}.json"
        rows = _read_json(path)["examples"]
        idx = _split_indices(plan["tasks"][task], split, len(rows), path)
        out.append([_bbh_example(f"{family.name}/{task}", task, i, rows[i], path) for i in idx])
    return out


def _bbh_example(source: str, task: str, i: int, row: dict[str, Any], path: Path) -> Example:
    text, target, where = row["input"], row["target"].strip(), f"{path}: example {i}"
    kind: AnswerKind = TEXT
    if parse_options(text) and re.fullmatch(r"\([A-Z]\)", target):
        kind = CHOICE
    elif task in BBH_NUMBER_TASKS:
        kind = NUMBER
    options = kind.options_of(text)
    return Example(f"{source}/{i}", source, text, kind.gold(target, options, where), kind.name, options, where=where)


def _load_bbq(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    folder = data_dir / family.data
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}; the data folder should hold {family.data}/<Category>_zero_shot.json")
    plan = _read_json(_split_file(family, data_dir))["categories"]
    if sub and sub not in plan:
        raise _unknown_task(f"{family.name}/{sub}", task_names(data_dir))
    out = []
    for category in [sub] if sub else sorted(plan):
        path = folder / f"{category}_zero_shot.json"
        rows = {row["example_id"]: row for row in _read_json(path)}
        ids = {
            "gather": plan[category]["gather_example_id"],
            "examine": plan[category]["exam_example_id"],
            "all": plan[category]["gather_example_id"] + plan[category]["exam_example_id"],
        }[split]
        missing = [i for i in ids if i not in rows]
        if missing:
            raise DataError(f"{path}: example_id {missing[0]} of the split file is not in the data")
        out.append([_bbq_example(family, category, rows[i], path) for i in ids])
    return out


def _bbq_example(family: Family, category: str, row: dict[str, Any], path: Path) -> Example:
    options = tuple(re.sub(r"^\([A-Z]\)\s?", "", o).strip() for o in row["options"])
    source, where = f"{family.name}/{category}", f"{path}: example_id {row['example_id']}"
    metadata = {"example_id": row["example_id"], "category": row["category"], "question_index": row["question_index"]}
    return Example(
        f"{source}/{row['example_id']}",
        source,
        row["input"],
        family.kind.gold(row["target"], options, where),
        family.kind.name,
        options,
        metadata,
        where,
    )


def _load_gsm8k(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    parts = {"gather": ["train"], "examine": ["test"], "all": ["train", "test"]}[split]
    examples = []
    for part in parts:
        path = data_dir / family.data / f"{part}.jsonl"
        for line_no, row in _read_jsonl(path):
            i, solution = line_no - 1, row["answer"]
            if "####" not in solution:
                raise DataError(f"{path}:{line_no}: answer has no '#### N' line")
            target = family.kind.gold(solution.rsplit("####", 1)[1].strip(), (), f"{path}:{line_no}")
            where, metadata = f"{path}:{line_no}", {"solution": solution}
            examples.append(
                Example(
                    f"{family.name}/{part}/{i}",
                    family.name,
                    row["question"],
                    target,
                    family.kind.name,
                    (),
                    metadata,
                    where,
                )
            )
    return [examples]


def _load_gsm_plus(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    """GSM-Plus testmini rows graded as numbers. "critical thinking" rows (gold "None": the question cannot be
    answered) are left out, since the number grader cannot credit a refusal; fraction golds (1/4) become decimals."""
    path = data_dir / family.data
    examples = []
    for line_no, row in _read_jsonl(path):
        answer = str(row["answer"]).strip()
        if answer == "None":
            continue
        if re.fullmatch(r"-?\d+/\d+", answer):
            numerator, denominator = answer.split("/")
            answer = f"{int(numerator) / int(denominator):g}"
        target = family.kind.gold(answer, (), f"{path}:{line_no}")
        metadata = {"perturbation_type": row["perturbation_type"], "solution": row.get("solution", "")}
        where = f"{path}:{line_no}"
        examples.append(
            Example(
                f"{family.name}/{line_no - 1}",
                family.name,
                row["question"],
                target,
                family.kind.name,
                (),
                metadata,
                where,
            )
        )
    return [examples]


def _load_mmlu(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    folder = data_dir / family.data
    if not folder.is_dir():
        raise DataError(f"missing folder {folder}; the data folder should hold {family.data}/<subject>_test.csv")
    plan = _read_json(_split_file(family, data_dir))["subjects"]
    if sub and sub not in plan:
        raise _unknown_task(f"{family.name}/{sub}", task_names(data_dir))
    out = []
    for subject in [sub] if sub else sorted(plan):
        path = folder / f"{subject}_test.csv"
        rows = list(csv.DictReader(io.StringIO(_read_text(path, newline=""), newline="")))
        idx = _split_indices(plan[subject], split, len(rows), path)
        out.append([_mmlu_example(family, subject, i, rows[i], path) for i in idx])
    return out


def _mmlu_example(family: Family, subject: str, i: int, row: dict[str, str], path: Path) -> Example:
    options = tuple(row[f"choice{k}"].strip() for k in range(4))
    if row["answer"] not in ("0", "1", "2", "3"):
        raise DataError(f"{path}: row {i}: answer must be 0-3, got {row['answer']!r}")
    target = f"({ascii_uppercase[int(row['answer'])]})"
    question = _with_options(row["question"].strip(), options)
    source = f"{family.name}/{subject}"
    return Example(f"{source}/{i}", source, question, target, family.kind.name, options, {"subject": subject})


def _load_arc(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    path = data_dir / family.data
    plan = _read_json(_split_file(family, data_dir))
    rows = [row for _, row in _read_jsonl(path)]
    keep = {"gather": set(plan["gather_id"]), "examine": set(plan["exam_id"])}.get(split)
    if keep is not None and len(keep & {row["id"] for row in rows}) != len(keep):
        raise DataError(f"{path}: some ids of {split} in splits/{family.splits} are not in the data")
    return [[_arc_example(family, row, path) for row in rows if keep is None or row["id"] in keep]]


def _arc_example(family: Family, row: dict[str, Any], path: Path) -> Example:
    options = tuple(t.strip() for t in row["choices"]["text"])
    labels = [str(label) for label in row["choices"]["label"]]  # "A".."E" or "1".."5": letters by position
    if row["answerKey"] not in labels:
        raise DataError(f"{path}: {row['id']}: answerKey {row['answerKey']!r} is not one of the labels {labels}")
    target = f"({ascii_uppercase[labels.index(row['answerKey'])]})"
    question = _with_options(row["question"].strip(), options)
    return Example(f"{family.ids or family.name}/{row['id']}", family.name, question, target, family.kind.name, options)


def _load_mbpp(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    """MBPP by the standard split's task ids (1-10 few-shot, 11-510 examine, 511-974 gather; all: every row)."""
    path = data_dir / family.data
    plan = _read_json(_split_file(family, data_dir))
    ranges = {"examine": [plan["test(exam)"]], "gather": [plan["validation(gather)"], plan["train(gather)"]]}
    keep = {i for lo, hi in ranges.get(split, []) for i in range(lo, hi + 1)}
    rows = [(line_no, row) for line_no, row in _read_jsonl(path) if split == "all" or row["task_id"] in keep]
    if split != "all" and len(rows) != len(keep):
        raise DataError(f"{path}: some task ids of {split} in splits/{family.splits} are not in the data")
    return [[_mbpp_example(row, f"{path}:{line_no}") for line_no, row in rows]]


def _mbpp_example(row: dict[str, Any], where: str) -> Example:
    """The task text, the entry point's signature (as the LLMs-as-Instructors paper adds it) and the tests."""
    code = _lf(row["code"])
    setup = _lf(row["test_setup_code"]).strip()
    tests = [_lf(t).strip() for t in row["test_list"]]
    entry, signature = _entry_point(code, tests[0], where)
    shown = "\n".join([setup, *tests] if setup else tests)
    text = (
        f"{row['text'].strip()}\nWrite it as a Python function with this signature:\n{signature}\n"
        f"Your code should pass these tests:\n{shown}"
    )
    # The setup builds the tests' inputs from what the solution defines (e.g. a Node class), so it runs after it.
    metadata = {"prefix": "", "tests": "\n".join([setup, *tests] if setup else tests), "entry_point": entry}
    return Example(f"mbpp/{row['task_id']}", "mbpp", text, code, "code", (), metadata, where)


def _entry_point(code: str, test: str, where: str) -> tuple[str, str]:
    """The function (or class) of ``code`` that the test calls first, and its ``def`` line.

    >>> _entry_point("import re\\ndef f(a, b):\\n    return a", "assert f(1, 2) == 1", "x")
    ('f', 'def f(a, b):')
    """
    try:
        defined = {n.name: n for n in ast.parse(code).body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        called = [
            n.func.id
            for n in ast.walk(ast.parse(test))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in defined
        ]
    except SyntaxError as e:
        raise DataError(f"{where}: the code or its first test is not valid Python ({e.msg})") from None
    if not called:
        raise DataError(f"{where}: the first test calls nothing the code defines")
    line = code.splitlines()[defined[called[0]].lineno - 1].strip()
    return called[0], line if line.endswith(":") else line.rstrip(" ;") + ":"


def _load_humaneval(family: Family, sub: str, split: Split, data_dir: Path) -> list[list[Example]]:
    path = data_dir / family.data
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"missing file {path}; check the data folder (see its README.md)") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    examples = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        examples.append(_humaneval_example(row, f"{path}:{line_no}"))
    return [examples]


def _humaneval_example(row: dict[str, Any], where: str) -> Example:
    """The prompt (signature and docstring) to complete; the reply may continue its body or restate the function."""
    prompt, entry = row["prompt"], row["entry_point"]
    text = f"Complete the Python function `{entry}`:\n```python\n{prompt.strip()}\n```"
    metadata = {"prefix": prompt, "tests": f"{row['test']}\ncheck({entry})", "entry_point": entry}
    number = row["task_id"].rpartition("/")[2]
    return Example(
        f"humaneval/{number}", "humaneval", text, prompt + row["canonical_solution"], "code", (), metadata, where
    )


# --- the task table ---

_ARC = Family(
    "arc_challenge",
    _load_arc,
    "arc_challenge/ARC-Challenge-Test.jsonl",
    "arc_challenge_80_20.json",
    "choice",
    ids="arc",  # its ids predate the name
)
FAMILIES = {"arc": _ARC} | {
    family.name: family
    for family in (
        _ARC,
        Family("bbh", _load_bbh, "bbh/tasks", "bbh_salam_80_20.json", None, subtasks=".json", groups=("salam16",)),
        Family(
            "bbq", _load_bbq, "bbq_sm", "bbq_sm_salam_80_20.json", "choice", subtasks="_zero_shot.json", ood_rest=True
        ),
        Family("gsm8k", _load_gsm8k, "gsm8k", None, "number", ood="gsm_plus"),
        # GSM-Plus perturbs GSM8K test questions, so it is never gathered on or trained on.
        Family("gsm_plus", _load_gsm_plus, "gsm_plus/gsmplus_testmini_part.jsonl", None, "number", eval_only=True),
        # HumanEval's 164 problems are all the test set there is (the paper's out-of-domain set for MBPP).
        Family("humaneval", _load_humaneval, "humaneval/HumanEval.jsonl.gz", None, "code", eval_only=True),
        Family("mbpp", _load_mbpp, "mbpp/mbpp.jsonl", "mbpp_standard.json", "code", ood="humaneval"),
        Family(
            "mmlu",
            _load_mmlu,
            "mmlu/test",
            "mmlu_per_subject_80_20.json",
            "choice",
            subtasks="_test.csv",
            ood="arc_challenge",
        ),
    )
}


# --- helpers ---


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def _with_options(question: str, options: Sequence[str]) -> str:
    lines = [f"({letter}) {text}" for letter, text in zip(ascii_uppercase, options, strict=False)]
    return "\n".join([question, "Options:", *lines])


def _split_indices(plan: dict[str, Any], split: Split, n: int, path: Path) -> list[int]:
    if plan["n"] != n:
        raise DataError(f"{path}: has {n} examples but the split file expects {plan['n']}; is the data complete?")
    indices: list[int] = {"gather": plan["gather_idx"], "examine": plan["exam_idx"], "all": list(range(n))}[split]
    return indices


def _round_robin(per_source: list[list[Example]], limit: int | None) -> list[Example]:
    """Take ``limit`` examples one source at a time in turn; return them grouped by source."""
    if limit is None:
        return [ex for examples in per_source for ex in examples]
    take = [0] * len(per_source)
    left = limit
    while left > 0 and any(t < len(src) for t, src in zip(take, per_source, strict=True)):
        for s, src in enumerate(per_source):
            if left > 0 and take[s] < len(src):
                take[s] += 1
                left -= 1
    return [ex for t, src in zip(take, per_source, strict=True) for ex in src[:t]]


def _split_file(family: Family, data_dir: Path) -> Path:
    return data_dir / "splits" / str(family.splits)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of examples, got {limit}")


def _require_data_dir(data_dir: Path) -> None:
    if not Path(data_dir).is_dir():
        raise ConfigError(f"benchmark data folder {data_dir} not found; pass --data-dir or set REDPEN_DATA_DIR")


def _unknown_task(name: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown task {name!r}{hint} (`redpen tasks` lists them all)")


def _read_text(path: Path, newline: str | None = None) -> str:
    try:
        with path.open(encoding="utf-8", newline=newline) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"missing file {path}; check the data folder (see its README.md)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a bad line is a ``DataError`` naming ``file:line``."""
    rows = []
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
