"""The report renderer and its statistics: McNemar, the paired bootstrap, prior shift, Markdown + HTML files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.report import (
    Report,
    answer_distribution,
    flag_prior_shift,
    mcnemar_exact,
    pair_by_id,
    paired_difference,
    paired_table,
    prior_shift,
)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (0, 10, 0.001953125),  # 2 / 2**10
        (5, 5, 1.0),
        (0, 0, 1.0),
        (2, 8, 0.109375),  # 2 * (1 + 10 + 45) / 1024
        (1, 11, 0.00634765625),  # 2 * (1 + 12) / 4096
        (8, 2, 0.109375),  # symmetric
    ],
)
def test_mcnemar_exact_known_values(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_paired_difference_counts_the_discordant_items() -> None:
    a = [True, True, False, False, True, False]
    b = [True, False, True, True, True, False]
    d = paired_difference(a, b)
    assert (d.n, d.a_only, d.b_only) == (6, 1, 2)
    assert (d.acc_a, d.acc_b, d.diff) == (0.5, 4 / 6, pytest.approx(1 / 6))
    assert d.p_mcnemar == mcnemar_exact(1, 2)


def test_the_ci_contains_the_difference_and_shrinks_with_n() -> None:
    def verdicts(n: int) -> tuple[list[bool], list[bool]]:
        # Per 10 items: 4 both right, 3 only B right, 1 only A right, 2 both wrong. Difference 0.2.
        a = [True] * 4 + [False] * 3 + [True] + [False] * 2
        b = [True] * 4 + [True] * 3 + [False] + [False] * 2
        return a * (n // 10), b * (n // 10)

    small, large = paired_difference(*verdicts(40)), paired_difference(*verdicts(400))
    for d in (small, large):
        assert d.diff == pytest.approx(0.2)
        assert d.ci_low < d.diff < d.ci_high
    assert large.ci_high - large.ci_low < (small.ci_high - small.ci_low) / 2  # about 1/sqrt(10) as wide
    assert large.p_mcnemar < small.p_mcnemar
    # Seeded: the same interval every time.
    assert paired_difference(*verdicts(40)) == small


def test_identical_conditions_have_a_zero_width_interval() -> None:
    d = paired_difference([True, False, True], [True, False, True])
    assert (d.diff, d.ci_low, d.ci_high, d.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)


def test_unequal_or_empty_verdicts_raise() -> None:
    with pytest.raises(ValueError, match="same items"):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])


def test_pairing_is_by_id_not_by_position() -> None:
    a = {"q1": True, "q2": False, "q3": False}
    b = {"q3": True, "q1": True, "q2": False}  # same items, another order
    assert pair_by_id(a, b) == ([True, False, False], [True, False, True])
    with pytest.raises(ValueError, match="same items"):
        pair_by_id(a, {"q1": True, "q2": True, "q4": True})


def test_the_prior_shift_flag_fires_on_a_one_letter_answerer() -> None:
    gold = answer_distribution(["(A)", "(B)", "(C)"] * 10)
    always_a = answer_distribution(["(A)"] * 30)
    matched = answer_distribution(["(A)", "(B)", "(C)"] * 9 + ["(A)", "(A)", "(B)"])
    assert prior_shift(always_a, gold) == pytest.approx(2 / 3, abs=1e-4)
    assert flag_prior_shift(always_a, gold)
    assert not flag_prior_shift(matched, gold)
    assert answer_distribution(["(B)", None]) == {"(B)": 1, "none": 1}


def _report() -> Report:
    report = Report("toy comparison")
    report.paragraph("Two conditions on the *same* items, with `code`.")
    a = [True, False, False, True, False] * 4
    b = [True, True, True, True, False] * 4
    report.table(*paired_table([("all", a, b)], "baseline", "assisted", first="items"))
    report.table(["source", "n", "accuracy", "chance"], [["x|y", 3, 2 / 3, None]])
    report.code("Step 1: <b>not html</b>")
    report.figure("bars.png", "Accuracy per condition.", lambda ax: ax.bar(["a", "b"], [0.4, 0.8]))
    return report


def test_markdown_has_the_paired_columns(tmp_path: Path) -> None:
    markdown = _report().markdown()
    assert (
        "| items | n | baseline | assisted | assisted - baseline | 95% CI | baseline only | assisted only "
        "| McNemar p |" in markdown
    )
    row = next(line for line in markdown.splitlines() if line.startswith("| all |"))
    assert re.fullmatch(
        r"\| all \| 20 \| 0\.400 \| 0\.800 \| \+0\.400 \| \[\+0\.\d{3}, \+0\.\d{3}\] \| 0 \| 8 \| .+ \|", row
    )
    assert row.endswith("| 0.008 |")  # mcnemar_exact(0, 8) = 2 / 256
    assert "| x\\|y | 3 | 0.667 | - |" in markdown  # a pipe in a cell is escaped, floats have 3 decimals
    assert "![Accuracy per condition.](bars.png)" in markdown


def test_html_is_self_contained(tmp_path: Path) -> None:
    md, page = _report().write(tmp_path)
    assert (md.name, page.name) == ("report.md", "report.html")
    html = page.read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r"(href|src)=\"(?!data:)", html)  # no link to anything outside the page
    assert "http://" not in html and "https://" not in html
    assert "&lt;b&gt;not html&lt;/b&gt;" in html and "<em>same</em>" in html and "<code>code</code>" in html
    assert (tmp_path / "bars.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_a_report_written_twice_replaces_itself(tmp_path: Path) -> None:
    _report().write(tmp_path)
    second = Report("second")
    second.paragraph("only this")
    md, page = second.write(tmp_path)
    assert md.read_text() == "# second\n\nonly this\n"
    assert "only this" in page.read_text() and "toy comparison" not in page.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
