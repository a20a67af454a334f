"""Commands on collections: ``pack``, ``add``, ``unpack``, ``remove`` (``inspect COLLECTION`` prints here too)."""

from __future__ import annotations

import sys

import click

from ..errors import FormatError, shown
from ..settings import CalibrationSettings, FitSettings, OutputSettings, QualitySettings, RankSettings, SizeSettings
from ..units import fmt_bytes, held_name
from .options import (
    flag_of,
    format_option,
    json_option,
    names_option,
    overwrite_option,
    rank_value,
    settings_options,
    texts_option,
    to_option,
    token_option,
)
from .progress import batch_bar, closing, progress_bar
from .sink import Sink, fmt_num, print_table


def print_collection(info) -> None:
    st = info.settings
    click.echo(f"collection:  {info.collection}  (format {info.format_version}, base model {info.base_model or '-'})")
    click.echo(
        f"bank:        N={st['num_vectors']}, L={st['vector_length']}, k={st['topk']}, {st['bank_dtype']}: {fmt_bytes(info.bank_bytes)}"
    )
    rows = [
        [
            shown(name),
            shown(e.source),
            e.source_sha256[:12],
            e.held_as,
            fmt_num(e.rel_error, ".4f"),
            fmt_num(e.retention, ".3f"),
            fmt_bytes(e.marginal_bytes),
            fmt_bytes(e.source_fp16_bytes),
            e.added_by + (" +cal" if e.calibrated else ""),
        ]
        for name, e in info.entries.items()
    ]
    click.echo()
    print_table(["adapter", "source", "sha256", "held as", "ΔW error", "retention", "marginal", "source fp16", "added"], rows)
    ratio = f"{info.ratio_vs_sources_fp16:.1%}" if info.ratio_vs_sources_fp16 else "-"
    click.echo(
        f"\ntotal:       {fmt_bytes(info.total_bytes)} for {len(rows)} adapter(s) = {ratio} of the sources at fp16 "
        f"({fmt_bytes(info.sources_fp16_bytes)}); {fmt_bytes(info.disk_bytes)} on disk"
    )
    for name, e in info.entries.items():
        v = e.verdict
        if v is not None and (v["kind"] == "plain" or v["keeps"] != "much"):
            click.echo(f"warning: {shown(name)}: {shown(v['line'])}")
    if getattr(info, "budget", None) is not None and info.total_bytes > info.budget:
        click.echo(
            f"note: the budget ({fmt_bytes(info.budget)}) chose N={st['num_vectors']} for bank codes; adapters held as "
            f"factors to meet the floor brought the total to {fmt_bytes(info.total_bytes)}"
        )
    if info.unlisted:
        click.echo(f"note: adapters/ also holds {', '.join(map(shown, info.unlisted))}, which the manifest does not name (left alone)")


def describe(t: dict) -> str:
    return held_name(t["codec"], t["rank"], t["bits"], bool(t.get("ranks")), t.get("vectors", 0))


def kept(t: dict) -> str:
    parts = [f"ΔW error {fmt_num(t['rel_error'], '.3f')}"] + ([f"retention {t['retention']:.3f}"] if t.get("retention") is not None else [])
    return ", ".join(parts)


def print_entries(entries, verb: str) -> None:
    """Per adapter: how it is held and what it keeps, then the verdict against plain truncation, and what the
    other representations tried kept."""
    for e in entries:
        retention = f", retention {e.retention:.3f}" if e.retention is not None else ""
        click.echo(
            f"{verb} {shown(e.name)}: held as {e.held_as} of rank {e.source_rank}, {fmt_bytes(e.marginal_bytes)} "
            f"({e.marginal_bytes / e.source_fp16_bytes:.1%} of its LoRA at fp16): ΔW error {fmt_num(e.rel_error, '.4f')}{retention} "
            f"(floor: {e.floor})"
        )
        v = e.verdict
        if v is not None:
            click.echo(f"  {'warning: ' if v['kind'] == 'plain' or v['keeps'] != 'much' else ''}{shown(v['line'])}")
        banks = [t for t in e.tried if t["codec"] == "bank"]
        if e.codec != "bank" and banks:
            bank = max(banks, key=lambda t: t["bytes"])
            click.echo(
                f"  the shared bank's codes ({describe(bank)}, {bank['bytes'] / e.source_fp16_bytes:.1%}) kept only {kept(bank)}: "
                "plain factors keep more here"
            )
        better = [t for t in e.tried if t["codec"] != e.codec and t["met"] and t["bytes"] > e.codes_bytes]
        if e.codec == "bank" and better:
            low = min(better, key=lambda t: t["bytes"])
            click.echo(
                f"  the floor is met, not more: {describe(low)} keep {kept(low)} at {low['bytes'] / e.source_fp16_bytes:.1%} "
                "(raise the floor to get it)"
            )


@click.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Collection directory to create.")
@names_option
@settings_options(FitSettings, "fit", skip=("code_refine_steps",))
@settings_options(OutputSettings, "output", skip=("full_logits",))
@settings_options(SizeSettings, "size", skip=("dry_run", "min_kl_retention"))
@settings_options(QualitySettings, "quality", skip=("grow",))  # pack fits its bank to every source: nothing to grow
@click.option("--base", default=None, help="Base model directory or Hub id: hold each adapter to a retention floor, calibrating its codes.")
@texts_option
@settings_options(CalibrationSettings, "calibration")  # with --base the bank trains first (steps, lr), then codes
@click.option("--allow-mixed-bases", is_flag=True, help="Pack adapters whose configs name different base models.")
@overwrite_option
@format_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print the collection summary as JSON.")
def pack(sources, out, names, fit, output, size, allow_mixed_bases, overwrite, fmt, token, as_json, **judging):
    """Fit ONE vector bank jointly to every adapter in SOURCES (paths or Hub ids of one base) and write a collection.

    The bank is paid for once; each adapter then costs only its codes. Each adapter weighs equally in the
    fit (relative ΔW error). Every adapter is held to a floor (--max-error, default 0.5; with --base,
    --min-kl-retention on held-out text, default 0.5): where the bank's codes miss it, or plain int-N SVD
    factors meet it in fewer bytes, the adapter is held as those factors, and the output says so. Add more
    later with `add`, get adapters back with `unpack`.
    """
    from ..collection import pack as pack_

    with closing(None if as_json else progress_bar()) as bar:
        summary = pack_(
            list(sources),
            out,
            fit,
            output=output,
            size=size,
            names=list(names) or None,
            allow_mixed_bases=allow_mixed_bases,
            format=fmt,
            overwrite=overwrite,
            token=token,
            progress=bar,
            **judging,
        )

    def text(info) -> None:
        print_entries(info.entries.values(), "packed")
        print_collection(info)

    Sink(as_json).result(summary, text)


def read_list(path: str) -> list[str]:
    """Sources from a file: one path or Hub id per line; blank lines and # comments are skipped."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(path, f"cannot read the source list ({e.__class__.__name__})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@click.command()
@click.argument("collection")
@click.argument("sources", nargs=-1)
@click.option("--from-list", "from_list", default=None, help="A file with one source (path or Hub id) per line, added after SOURCES.")
@names_option
@settings_options(FitSettings, "fit", skip=("num_vectors", "vector_length", "topk", "rank", "iters", "refine_steps"))
@click.option(
    "--workers", default=1, show_default=True, type=int, help="Encode in a local pool of this many processes (this process writes)."
)
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    default=None,
    help="Encode as Ray tasks: --ray for a local Ray, --ray ADDRESS for a cluster (pip install 'vbcompress[ray]').",
)
@click.option(
    "--base",
    default=None,
    help="Base model directory or Hub id: calibrate each new adapter's logits on its function (the bank stays frozen).",
)
@texts_option
@settings_options(CalibrationSettings, "calibration", skip=("steps", "lr"))  # codes only: the bank is frozen
@settings_options(QualitySettings, "quality")
@click.option("--allow-mixed-bases", is_flag=True, help="Add adapters whose configs name another base model.")
@format_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print what was added, skipped and failed as JSON.")
def add(collection, sources, from_list, names, fmt, as_json, **options):
    """Encode each adapter in SOURCES against the frozen bank of COLLECTION and add it (codes only).

    Each adapter is held the cheapest way that meets the floor (--max-error, default 0.5; with --base,
    --min-kl-retention on held-out text, default 0.5): bank codes of its top directions, or plain int-N SVD
    factors where those keep more for the bytes; one that nothing meets is refused. Each source lands or fails on its own: a failure (not found, gated, NaN, does not fit the bank) is
    printed, recorded in COLLECTION/failures.json, and the batch goes on; the exit code is 2 if any failed.
    Re-running the same command skips what is already in (same source, same weights hash) and retries the
    failures, so a killed batch resumes where it stopped.
    """
    from ..collection import add as add_

    sources = list(sources) + (read_list(from_list) if from_list else [])
    if not sources:
        raise click.UsageError("name at least one source, or --from-list FILE")
    single = len(sources) == 1
    with closing(None if as_json else (progress_bar() if single else batch_bar(len(sources)))) as bar:
        report = add_(
            collection,
            sources,
            names=list(names) or None,
            format=fmt,
            keep_going=True,
            progress=bar if single else None,
            on_outcome=None if single or not bar else bar,
            **options,
        )

    def text(report) -> None:
        print_entries(report.added, "added")
        if report.skipped:
            click.echo(f"skipped {len(report.skipped)} source(s) already in the collection")
        for note in report.notes:
            click.echo(f"note: {shown(note)}", err=True)
        if single and report.failed:
            click.echo(f"error: {report.failed[0].outcome.error.render(flag_of)}", err=True)
        elif report.failed:
            click.echo(
                f"{len(report.failed)} source(s) failed (listed in {collection}/failures.json); re-run the same command to retry them"
            )

    Sink(as_json).result(report, text)
    if report.failed:
        sys.exit(2)


@click.command()
@click.argument("collection")
@click.argument("names", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Output directory: the adapter for one NAME, OUT/NAME for several.")
@click.option("--dense", is_flag=True, help="Write a dense LoRA instead of VB-LoRA (rank rules as vb2lora).")
@click.option("--rank", default=None, help="With --dense: integer cap, or 'auto' (per-module by --rule) [default: full rank, exact].")
@to_option
@settings_options(RankSettings, "rank_settings")
@overwrite_option
@json_option
def unpack(collection, names, out, dense, rank, to, rank_settings, overwrite, as_json):
    """Write adapters NAMES of COLLECTION as PEFT VB-LoRA adapters (bank included) that PEFT loads."""
    from ..collection import Collection

    report = Collection(collection).unpack(
        list(names), out, dense=dense, rank=rank_value(rank), rank_settings=rank_settings, overwrite=overwrite, to=to
    )

    def text(report) -> None:
        for name, path, what in zip(report.names, report.paths, report.written_as):
            held = "" if report.dense or what == "VB-LoRA" else f": held as {Collection(collection).entry(name).held_as}"
            click.echo(f"wrote {shown(path)}  ({shown(name)}, {what}{held})")

    Sink(as_json).result(report, text)


@click.command()
@click.argument("collection")
@click.argument("names", nargs=-1, required=True)
@json_option
def remove(collection, names, as_json):
    """Remove adapters NAMES from COLLECTION (the bank stays as it is)."""
    from ..collection import remove as remove_

    report = remove_(collection, list(names))
    Sink(as_json).result(report, lambda r: click.echo(f"removed {', '.join(r.removed)} from {r.collection}"))
