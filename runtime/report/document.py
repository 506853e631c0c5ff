"""One report renderer: a document of headings, paragraphs, tables, code and figures, written as Markdown + HTML.

``report.md`` links its figures as PNG files beside it; ``report.html`` is self-contained (its CSS inline and the
PNGs as base64 data URIs), so it can be mailed or opened anywhere. Text is Markdown with inline code, bold and
italics only; every file is written to a temporary name and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.report.stats import paired_difference

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DIGITS = 3  # accuracies of a few hundred items: the third decimal is already below the noise

_NUMERIC = re.compile(r"^\[?[-+]?\d|^-$")  # right-aligned cells: numbers, "0.250 (1/4)", "[-0.1, +0.2]", "-"
_INLINE = re.compile(r"\*\*(.+?)\*\*|\*(.+?)\*")
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
code { background: #f3f3f3; padding: 0 0.2rem; }
figure { margin: 1rem 0; }
img { max-width: 100%; }
figcaption { font-size: 0.85rem; color: #555; }
"""


def fmt(value: object, digits: int = DIGITS) -> str:
    """A table cell: floats to ``digits`` decimals, None as "-", anything else as its text.

    >>> fmt(0.25), fmt(3), fmt(None), fmt("(A)")
    ('0.250', '3', '-', '(A)')
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_p(p: float) -> str:
    """A p-value: three decimals, or scientific notation below 0.001 so that it never reads as zero.

    >>> fmt_p(0.0412), fmt_p(0.00042), fmt_p(1.0)
    ('0.041', '4.2e-04', '1.000')
    """
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def paired_table(
    rows: Sequence[tuple[str, Sequence[bool], Sequence[bool]]],
    label_a: str = "A",
    label_b: str = "B",
    first: str = "comparison",
) -> tuple[list[str], list[list[object]]]:
    """Headers and rows of a paired comparison: per row, B against A on the same items (verdicts already paired).

    >>> headers, rows = paired_table([("all", [False, True], [True, True])], "baseline", "assisted")
    >>> headers[4:]
    ['assisted - baseline', '95% CI', 'baseline only', 'assisted only', 'McNemar p']
    >>> rows[0][:5], rows[0][6:]
    (['all', 2, '0.500', '1.000', '+0.500'], [0, 1, '1.000'])
    """
    headers = [
        first,
        "n",
        label_a,
        label_b,
        f"{label_b} - {label_a}",
        "95% CI",
        f"{label_a} only",
        f"{label_b} only",
        "McNemar p",
    ]
    table: list[list[object]] = []
    for name, a, b in rows:
        d = paired_difference(a, b)
        table.append(
            [
                name,
                d.n,
                fmt(d.acc_a),
                fmt(d.acc_b),
                f"{d.diff:+.{DIGITS}f}",
                f"[{d.ci_low:+.{DIGITS}f}, {d.ci_high:+.{DIGITS}f}]",
                d.a_only,
                d.b_only,
                fmt_p(d.p_mcnemar),
            ]
        )
    return headers, table


PAIRED_NOTE = (
    "Each row compares B with A on the same items, item by item: *B - A* is the difference in accuracy, its 95% CI "
    "a bootstrap over items (10,000 resamples); *A only* and *B only* count the items only one of the two got "
    "right, and the exact McNemar p-value tests whether those two counts differ by more than chance."
)


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclass(frozen=True)
class _Bullets:
    items: list[str]


@dataclass(frozen=True)
class _Code:
    text: str


@dataclass(frozen=True)
class _Table:
    headers: list[str]
    cells: list[list[str]]
    right: list[bool]  # per column: right-aligned (numbers)


@dataclass
class _Figure:
    name: str
    caption: str
    draw: Callable[[Axes], None]
    size: tuple[float, float]
    png: bytes | None = field(default=None, repr=False)

    def render(self) -> bytes:
        """The PNG, drawn once on first use."""
        if self.png is None:
            import matplotlib

            matplotlib.use("Agg")  # files only, no display
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=self.size)
            try:
                self.draw(ax)
                fig.tight_layout()
                buffer = io.BytesIO()
                fig.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
            finally:
                plt.close(fig)
            self.png = buffer.getvalue()
        return self.png


class Report:
    """A report built top to bottom; ``write`` turns it into ``<stem>.md``, ``<stem>.html`` and its PNGs.

    >>> r = Report("toy")
    >>> r.table(["source", "n", "accuracy"], [["a", 3, 2 / 3]])
    >>> print(r.markdown())
    # toy
    <BLANKLINE>
    | source | n | accuracy |
    |---|---:|---:|
    | a | 3 | 0.667 |
    <BLANKLINE>
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._blocks: list[_Heading | _Paragraph | _Bullets | _Code | _Table | _Figure] = []

    def heading(self, text: str, level: int = 2) -> None:
        self._blocks.append(_Heading(level, text))

    def paragraph(self, text: str) -> None:
        self._blocks.append(_Paragraph(text))

    def bullets(self, items: Sequence[str]) -> None:
        self._blocks.append(_Bullets(list(items)))

    def code(self, text: str) -> None:
        self._blocks.append(_Code(text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """Cells through :func:`fmt`; a column of numbers (all but the first column) is right-aligned."""
        cells = [[fmt(v) for v in row] for row in rows]
        right = [i > 0 and all(_NUMERIC.match(row[i]) for row in cells) for i in range(len(headers))]
        self._blocks.append(_Table(list(headers), cells, right))

    def figure(
        self, png_name: str, caption: str, draw: Callable[[Axes], None], size: tuple[float, float] = (6.4, 4.2)
    ) -> None:
        """A plot that ``draw`` makes on one matplotlib Axes (Agg backend), saved as ``png_name`` beside the report."""
        self._blocks.append(_Figure(png_name, caption, draw, size))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self._blocks:
            match block:
                case _Heading(level, text):
                    out += [f"{'#' * level} {text}", ""]
                case _Paragraph(text):
                    out += [text, ""]
                case _Bullets(items):
                    out += [*(f"- {item}" for item in items), ""]
                case _Code(text):
                    out += ["```", text, "```", ""]
                case _Table(headers, cells, right):
                    out.append(_md_row(headers))
                    out.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
                    out += [_md_row(row) for row in cells]
                    out.append("")
                case _Figure():
                    out += [f"![{block.caption}]({block.name})", "", f"*{block.caption}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        """The whole report as one HTML page with nothing outside it: inline CSS, figures as data URIs."""
        out = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{_inline(self.title)}</h1>",
        ]
        for block in self._blocks:
            match block:
                case _Heading(level, text):
                    out.append(f"<h{level}>{_inline(text)}</h{level}>")
                case _Paragraph(text):
                    out.append(f"<p>{_inline(text)}</p>")
                case _Bullets(items):
                    out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
                case _Code(text):
                    out.append(f"<pre>{html.escape(text)}</pre>")
                case _Table(headers, cells, right):
                    out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in headers) + "</tr>")
                    out.append("</thead><tbody>")
                    for row in cells:
                        tds = (
                            f'<td class="num">{_inline(c)}</td>' if r else f"<td>{_inline(c)}</td>"
                            for c, r in zip(row, right, strict=True)
                        )
                        out.append("<tr>" + "".join(tds) + "</tr>")
                    out.append("</tbody></table>")
                case _Figure():
                    data = base64.b64encode(block.render()).decode("ascii")
                    out.append(
                        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                        f"<figcaption>{_inline(block.caption)}</figcaption></figure>"
                    )
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def write(self, folder: Path, stem: str = "report") -> tuple[Path, Path]:
        """Write ``<stem>.md``, ``<stem>.html`` and each figure's PNG into ``folder``, replacing an earlier report."""
        folder.mkdir(parents=True, exist_ok=True)
        for block in self._blocks:
            if isinstance(block, _Figure):
                _write_atomic(folder / block.name, block.render())
        md, page = folder / f"{stem}.md", folder / f"{stem}.html"
        _write_atomic(md, self.markdown().encode("utf-8"))
        _write_atomic(page, self.html().encode("utf-8"))
        return md, page


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _inline(text: str) -> str:
    """Markdown's inline code, bold and italics as HTML; everything else escaped."""
    parts = re.split(r"`([^`]*)`", text)  # odd parts are code spans, whose content is left as it is
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            out.append(
                _INLINE.sub(
                    lambda m: f"<strong>{m[1]}</strong>" if m[1] is not None else f"<em>{m[2]}</em>",
                    html.escape(part),
                )
            )
    return "".join(out)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
