"""Click options built from the settings dataclasses (every default lives in ``settings.py``), injected
into commands as finished settings objects, and the options several commands share."""

from __future__ import annotations

import functools
from dataclasses import MISSING, fields

import click

from ..settings import DENSE_FORMATS, FORMATS, CalibrationSettings

# Settings classes whose flags carry a prefix, and library names whose flag is not simply --setting-name.
PREFIXES = {CalibrationSettings: "calib-"}
RENAMED = {"texts": "--calibration", "adapter_src": "--adapter", "format": "--format"}
FLAGS = {**RENAMED, **{f.name: "--" + p + f.name.replace("_", "-") for cls, p in PREFIXES.items() for f in fields(cls)}}


def flag_of(setting: str) -> str:
    """The command-line flag of a library setting name (``num_vectors`` → ``--num-vectors``)."""
    return FLAGS.get(setting) or "--" + setting.replace("_", "-")


def settings_options(cls, param: str, skip: tuple[str, ...] = ()):
    """A decorator adding one click option per CLI-visible field of the settings dataclass ``cls`` (help,
    default and choices from the field) and handing the command a finished ``cls`` object as ``param``."""
    prefix = PREFIXES.get(cls, "")
    opts, dests = [], {}
    for f in fields(cls):
        md = f.metadata
        if not md.get("cli", False) or f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        decls = [flag] + ([md["short"]] if md.get("short") else [])
        dest = (prefix + f.name).replace("-", "_")
        dests[dest] = f.name
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            opts.append(click.option(*decls, dest, is_flag=True, default=default, help=md["help"]))
            continue
        kind = click.Choice(md["choices"]) if md.get("choices") else (type(default) if default is not None else md.get("kind") or int)
        opts.append(click.option(*decls, dest, default=default, type=kind, show_default=default is not None, help=md["help"]))

    def decorate(command):
        @functools.wraps(command)
        def with_settings(*args, **kwargs):
            kwargs[param] = cls(**{name: kwargs.pop(dest) for dest, name in dests.items()})
            return command(*args, **kwargs)

        for option in reversed(opts):
            with_settings = option(with_settings)
        return with_settings

    return decorate


def rank_value(value: str | None):
    """``--rank``: an integer, ``auto``, or absent."""
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither an integer nor 'auto'") from None


json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier vbcompress output.")
token_option = click.option(
    "--token", default=None, help="Hugging Face token for private or gated Hub ids [default: HF_TOKEN or the saved login]."
)
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None, help="Force the input format instead of detecting it."
)
to_option = click.option(
    "--to",
    type=click.Choice(DENSE_FORMATS),
    default=None,
    help="Write the dense LoRA as PEFT, kohya (one .safetensors for ComfyUI/A1111) or diffusers [default: the source's own family; PEFT for others].",
)
names_option = click.option(
    "--name", "names", multiple=True, help="Name of each source in order (repeat) [default: folder/file stem or Hub repo name]."
)
base_option = click.option(
    "--base", default=None, help="Base model directory or Hub id: calibrate on the adapter's function after the weight fit."
)
texts_option = click.option(
    "--calibration", "texts", default=None, help="Calibration text: one sample per line, or JSONL with 'text' [default: data-free]."
)


def stack(*decorators):
    """Apply ``decorators`` in reading order (the first is outermost), as a decorator."""

    def decorate(f):
        for d in reversed(decorators):
            f = d(f)
        return f

    return decorate
