"""Output for every bench script: aligned text, Markdown, JSON and PNG, plus ratios.

A script builds one or more :class:`Table` objects (header line, column names, rows of
already formatted cells), prints them with :func:`render_text` and hands them to
:func:`write_outputs` with its JSON payload: ``--json``, ``--markdown`` and ``--png``
(:func:`add_output_args`) mean the same in every script. Ratios are always against a
baseline measured in the same run (:func:`ratio`): numbers from different runs on a
shared machine are not comparable, ratios within one run are.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------
# Numbers to cells
# ----------------------------------------------------------------------------------


def fmt_s(x: float | None) -> str:
    """Seconds: 4 decimals below 0.1 s, 3 above; "-" for nothing."""
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:.4f}" if x < 0.1 else f"{x:.3f}"


def fmt_ms(x: float | None) -> str:
    """Seconds shown as milliseconds with one decimal."""
    return "-" if x is None or x != x else f"{x * 1e3:.1f}ms"


def fmt_mib(x: float | None) -> str:
    """MiB: whole numbers from 100 up, one decimal below."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


def fmt_num(x: float | None, digits: int = 2, suffix: str = "") -> str:
    """A plain number with ``digits`` decimals and an optional suffix ("%", "x")."""
    return "-" if x is None or x != x else f"{x:.{digits}f}{suffix}"


def ratio(x: float | None, base: float | None) -> float | None:
    """``x / base`` against the in-run baseline; None when either is missing."""
    if x is None or base is None or base <= 0 or x != x or base != base:
        return None
    return x / base


def fmt_ratio(x: float | None) -> str:
    """A ratio as ``1.23x``."""
    return fmt_num(x, 2, "x")


# ----------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------


@dataclass
class Table:
    """One table: a header line, column names and formatted rows.

    ``free_last``: the last column is free text (a note), printed unpadded.
    ``footer``: lines printed after the table (e.g. the knee per size).
    """

    header: str
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    free_last: bool = False
    footer: list[str] = field(default_factory=list)

    def add(self, cells: Sequence[str]) -> None:
        """Append one row (as many cells as columns)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append(list(cells))


def render_text(table: Table) -> str:
    """Aligned plain text: first column left, numbers right, a free last column as is."""
    cells = [list(table.columns)] + table.rows
    n = len(table.columns) - (1 if table.free_last else 0)
    widths = [max(len(row[i]) for row in cells) for i in range(n)]
    lines = [table.header] if table.header else []
    for j, row in enumerate(cells):
        parts = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row[:n])]
        parts += row[n:]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths) + ("  ----" if table.free_last else ""))
    lines += table.footer
    return "\n".join(lines)


def render_markdown(table: Table) -> str:
    """GitHub-flavoured Markdown: the header line, a blank line, the table, the footer."""
    out = [table.header, ""] if table.header else []
    out += ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    if table.footer:
        out += [""] + table.footer
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------


def add_output_args(parser: argparse.ArgumentParser, png: str | None = None) -> None:
    """``--json``, ``--markdown`` and (when the script draws one, described by ``png``)
    ``--png``: the same options in every script."""
    parser.add_argument("--json", default=None, metavar="PATH", help="also write results as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH", help="also write the table(s) as Markdown")
    if png:
        parser.add_argument("--png", default=None, metavar="PATH", help=f"also write {png} (needs matplotlib)")


def emit(args: argparse.Namespace, tables: Sequence[Table], payload: Any,
         png: Callable[[Any, str], bool] | None = None) -> None:
    """Print the tables, then write what ``--json``/``--markdown``/``--png`` asked for."""
    print("\n\n".join(render_text(t) for t in tables))
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    if getattr(args, "markdown", None):
        Path(args.markdown).write_text("\n".join(render_markdown(t) for t in tables))
    if png is not None and getattr(args, "png", None):
        pyplot = load_pyplot()
        if pyplot is not None:
            png(pyplot, args.png)


def load_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None (with a one-line warning) when
    matplotlib is not installed: the bench runs without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; before pyplot is imported
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"[bench] --png skipped: matplotlib is not installed ({e}); pip install 'zckpt[bench]'",
              file=sys.stderr)
        return None
    return plt


def bar_chart(plt: Any, path: str, names: Sequence[str],
              series: Sequence[tuple[str, str, Sequence[float | None]]], title: str) -> bool:
    """Grouped bars per name, one bar per series ``(label, colour, values)``; a missing
    value shows "n/a"; log scale when the values span more than 100x."""
    values = [v for _, _, vals in series for v in vals if v is not None and v > 0]
    if not values:
        print("[bench] --png skipped: no method has a measured time", file=sys.stderr)
        return False
    log = max(values) / min(values) > 100
    width = 0.76 / len(series)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.05 * len(names) + 2.5), 5.2))
    floor = min(values) if log else 0.0  # where a missing bar's "n/a" sits
    for j, (label, color, vals) in enumerate(series):
        offset = (j - (len(series) - 1) / 2) * width
        have = [(i + offset, v) for i, v in enumerate(vals) if v is not None and v > 0]
        ax.bar([x for x, _ in have], [v for _, v in have], width, label=label, color=color)
        for x, v in have:
            ax.annotate(fmt_s(v), (x, v), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
        for i, val in enumerate(vals):
            if val is None:  # e.g. memcpy_warm never touches disk
                ax.annotate("n/a", (i + offset, floor), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, color="gray")
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("seconds (median)" + (", log scale" if log else ""))
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3, which="both" if log else "major")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def line_chart(plt: Any, path: str, lines: Mapping[str, Sequence[tuple[float, float]]],
               xlabel: str, ylabel: str, title: str) -> bool:
    """One line per label through its ``(x, y)`` points."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
