"""One output sink: a command hands it its report and a text printer; ``--json`` prints the report's
``to_json()`` instead. Progress goes to stderr, results to stdout."""

from __future__ import annotations

import json
from collections.abc import Callable

import click


class Sink:
    """Where a command's result goes: text through the command's printer, or the report as JSON."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def result(self, report, text: Callable[[object], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
        else:
            text(report)


def fmt_num(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))
