"""The ``vbcompress`` command line: parse arguments, call the library, print. Nothing else."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import VBCompressError
from .formats import FORMATS


class Group(click.Group):
    """Turns library errors into one line on stderr and exit code 2 (``--debug`` shows the traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VBCompressError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def fmt_num(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            click.echo("  ".join("-" * w for w in widths))


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vbcompress")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Shrink trained LoRA adapters into PEFT's VB-LoRA vector-bank format, and convert between formats."""


format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None, help="Force the input format instead of detecting it."
)


@main.command()
@click.argument("path")
@click.option("--threshold", default=0.9, show_default=True, type=float, help="SARA threshold m for the effective rank.")
@format_option
@click.option("--json", "as_json", is_flag=True, help="Print stable JSON instead of a table.")
def inspect(path: str, threshold: float, fmt: str | None, as_json: bool) -> None:
    """Show what the adapter at PATH holds: format, shapes, ranks, sizes and per-module spectra."""
    from .report import inspect_adapter

    info = inspect_adapter(path, threshold=threshold, format=fmt)
    if as_json:
        emit_json(info)
        return
    vb = info["vector_bank"]
    click.echo(f"file:        {info['file']}")
    click.echo(f"format:      {info['format']}" + (f" (N={vb['num_vectors']}, L={vb['vector_length']}, k={vb['topk']})" if vb else ""))
    click.echo(f"base model:  {info['base_model'] or '-'}    task: {info['task_type'] or '-'}    dtype: {info['dtype']}")
    click.echo(f"modules:     {info['num_modules']}    rank(s): {', '.join(map(str, info['ranks']))}")
    click.echo(
        f"LoRA:        {info['lora_params']:,} params, {fmt_bytes(info['stored_bytes'])} stored"
        f" ({fmt_bytes(info['fp16_bytes'])} at fp16)"
    )
    click.echo(f"carried:     {info['carried_params']:,} params, {fmt_bytes(info['carried_bytes'])} ({len(info['carried_keys'])} tensors)")
    rows = [
        [
            m["name"],
            f"{m['out']}x{m['in']}",
            m["r"],
            fmt_num(m["scale"]),
            fmt_num(m["norm"]),
            fmt_num(m["sigma_max"]),
            fmt_num(m["effective_rank"], "d"),
            fmt_num(m["top_energy"], ".2f"),
            "NaN/Inf" if m["nonfinite"] else ("zero" if m["zero"] else ""),
        ]
        for m in info["modules"]
    ]
    click.echo()
    print_table(["module", "out x in", "r", "scale", "|dW|_F", "sigma_max", f"eff.rank@{threshold:g}", "top1", "note"], rows)
    if info["zero_modules"]:
        click.echo(f"\n{len(info['zero_modules'])} module(s) are all zero (ΔW = 0).")
    if info["nonfinite_modules"]:
        click.echo(f"\nwarning: {len(info['nonfinite_modules'])} module(s) hold NaN/Inf: this adapter is broken.", err=True)
