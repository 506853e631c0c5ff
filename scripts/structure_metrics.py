"""Count the structural figures issue reviews track: option declarations, command length, string branches.

Run from the repository root: ``python scripts/structure_metrics.py``. Prints one line per figure.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGES = ("agents", "memory", "training", "runtime")


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in Path(pkg).rglob("*.py"))


def _option_declarations(text: str) -> int:
    return len(re.findall(r"\btyper\.(?:Option|Argument)\(", text))


def _longest_command(paths: list[Path]) -> tuple[int, str]:
    """The longest function in the CLI package, by lines (the command functions live there)."""
    best = (0, "")
    for path in paths:
        if "cli" not in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                length = node.end_lineno - node.lineno + 1
                best = max(best, (length, f"{path}:{node.name}"))
    return best


def main() -> None:
    paths = _sources()
    texts = {p: p.read_text() for p in paths}
    options = sum(_option_declarations(t) for t in texts.values())
    kind = re.compile(r"answer_kind\s*[!=]=")
    kind_branches = sum(len(kind.findall(t)) for t in texts.values())
    kind_files = sum(1 for t in texts.values() if kind.search(t))
    read = re.compile(r"\b\w+\[\"(?:verdict|correct|prediction|gold|item_id|answer)\"\]")
    record_reads = sum(len(read.findall(t)) for t in texts.values())
    length, where = _longest_command(paths)
    print(f"CLI option declarations: {options}")
    print(f"longest CLI function: {length} lines ({where})")
    print(f"answer_kind ==/!= branches: {kind_branches} in {kind_files} files")
    print(f'record dict reads (r["verdict"] and kin): {record_reads}')
    print(f"library lines: {sum(t.count(chr(10)) for t in texts.values())} in {len(paths)} files")


if __name__ == "__main__":
    main()
