"""What an instructor run reads: each target's train pool and dev slice, and the in- and out-of-domain sets.

A target may be a union of sources of one family (``bbq/Age+SES+Religion``), so that the rest of the family can
serve as its out-of-domain set. Out-of-domain pairs are the task table's (``runtime.data.tasks.FAMILIES``), after the
LLMs-as-Instructors paper: MMLU -> ARC-Challenge, GSM8K -> GSM-Plus, MBPP -> HumanEval; BBQ categories -> the BBQ
categories left out of the target; BBH as the holistic set. A target may also be a bring-your-own train JSONL
(``mine.jsonl``), with its own examine file; an out-of-domain set may be any JSONL.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from runtime.data.tasks import FAMILIES, Example, load_jsonl, load_task, task_names
from runtime.errors import ConfigError

HOLISTIC = "bbh"


@dataclass(frozen=True)
class Target:
    name: str
    pool: list[Example]  # the train part minus dev: what selections and baseline rows are drawn from
    dev: list[Example]  # held out of every selection: choose settings here, never on an examine split


def is_jsonl(spec: str) -> bool:
    """A bring-your-own file rather than a task name."""
    return spec.endswith(".jsonl")


def load_union(spec: str, split: str, data_dir: Path, limit: int | None = None) -> list[Example]:
    """A task, or a union of one family's sources written ``family/a+b+c``; ``limit`` spreads over the sources."""
    family, _, subs = spec.partition("/")
    if "+" not in subs:
        return load_task(spec, split, data_dir, limit)  # type: ignore[arg-type]
    parts = [load_task(f"{family}/{s}", split, data_dir) for s in subs.split("+")]  # type: ignore[arg-type]
    merged: list[Example] = []
    for i in range(max(len(p) for p in parts)):
        merged += [p[i] for p in parts if i < len(p)]
    return merged[:limit] if limit is not None else merged


def load_benchmark(spec: str, data_dir: Path, limit: int, answer_kind: str, source: str | None = None) -> list[Example]:
    """An evaluation set: a task's (or union's) examine split, or a JSONL file's rows."""
    if is_jsonl(spec):
        return load_jsonl(Path(spec), answer_kind, source=source, limit=limit)
    return load_union(spec, "examine", data_dir, limit)


def load_target(spec: str, data_dir: Path, dev_fraction: float, seed: int, answer_kind: str = "choice") -> Target:
    """The target's train part, with a seeded ``dev_fraction`` of each source held out as dev."""
    if is_jsonl(spec):
        rows = load_jsonl(Path(spec), answer_kind)
    else:
        rows = load_union(spec, "gather", data_dir)
    by_source: dict[str, list[Example]] = {}
    for e in rows:
        by_source.setdefault(e.source, []).append(e)
    pool, dev = [], []
    for source, items in sorted(by_source.items()):
        order = list(items)
        random.Random(f"{seed}/{source}/dev").shuffle(order)
        cut = max(1, round(len(order) * dev_fraction))
        dev += order[:cut]
        pool += order[cut:]
    return Target(spec, pool, dev)


def default_ood(targets: list[str], data_dir: Path) -> list[str]:
    """Each target's out-of-domain pair, then the holistic set (unless a target is itself BBH)."""
    ood: list[str] = []
    for spec in targets:
        if is_jsonl(spec):  # no known pair; give its out-of-domain sets with --ood
            continue
        name, _, subs = spec.partition("/")
        family = FAMILIES.get(name)
        if family is None:
            continue
        if family.ood:
            ood.append(family.ood)
        elif family.ood_rest and subs:
            chosen = set(subs.split("+"))
            rest = [n.partition("/")[2] for n in task_names(data_dir) if n.startswith(f"{name}/")]
            left = [c for c in rest if c not in chosen]
            if left:
                ood.append(f"{name}/" + "+".join(left))
    if not any(not is_jsonl(t) and t.partition("/")[0] == HOLISTIC for t in targets):
        ood.append(HOLISTIC)
    return list(dict.fromkeys(o for o in ood if o not in targets))


def check_disjoint(targets: list[str], ood: list[str]) -> None:
    overlap = set(targets) & set(ood)
    if overlap:
        raise ConfigError(f"--ood {sorted(overlap)} is also a target: out-of-domain sets must be left out of training")
