"""The ``vbcompress`` command line: parse arguments, call the library, print through one sink. Nothing else."""

from __future__ import annotations

import json
import sys

import click

from ..errors import VBCompressError
from ..version import __version__
from .adapters import eval_cmd, hub, inspect, lora2vb, merge, resize, vb2lora
from .collections import add, pack, remove, unpack
from .options import flag_of

__all__ = ["main"]


class Group(click.Group):
    """Turns library errors into one line on stderr (a JSON object on stdout with ``--json``) and exit code 2,
    Ctrl-C into exit code 130; ``--debug``, before or after the command, shows the traceback instead."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for flag, short in (("--debug", None), ("--quiet", "-q")):  # accepted after the subcommand too
            if any(a in (flag, short) for a in args[1:]):
                args = [flag] + [a for a in args if a not in (flag, short)]
        ctx.meta["as_json"] = "--json" in args
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command's whole first sentence (click cuts it at 45 characters with "…")."""
        rows = [(name, self.get_command(ctx, name).get_short_help_str(limit=300)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VBCompressError as e:
            if ctx.params.get("debug"):
                raise
            message = e.render(flag_of)
            if ctx.meta.get("as_json"):
                error = {"error": message, "kind": type(e).__name__, "where": e.where, "setting": e.setting and flag_of(e.setting)}
                click.echo(json.dumps(error))
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vbcompress")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (results and errors are still printed).")
def main(debug: bool, quiet: bool) -> None:
    """Shrink trained LoRA adapters into PEFT's VB-LoRA vector-bank format, and convert between formats."""
    import signal
    import threading

    from . import progress

    progress.quiet = quiet
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame):
    # SIGTERM unwinds like an exception, so temporary output is removed; the exit code says why (128 + 15).
    raise SystemExit(143)


for command in (inspect, lora2vb, hub, eval_cmd, vb2lora, resize, merge, pack, add, unpack, remove):
    main.add_command(command)
