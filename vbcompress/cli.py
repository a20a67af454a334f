"""The ``vbcompress`` command line: parse arguments, call the library, print. Nothing else."""

from __future__ import annotations

import json
import sys

import click

from dataclasses import MISSING, fields

from .errors import VBCompressError
from .formats import DENSE_FORMATS, FORMATS
from .metrics import fmt_bytes
from .settings import CalibrationSettings, FitSettings, MergeSettings, OutputSettings, RankSettings
from .version import __version__

# Library setting names whose flag is not simply --setting-name.
FLAGS = {"texts": "--calibration", "adapter_src": "--adapter", "format": "--format"}


def flag_of(setting: str) -> str:
    return FLAGS.get(setting) or "--" + setting.replace("_", "-")


class Group(click.Group):
    """Turns library errors into one line on stderr (a JSON object on stdout with ``--json``) and exit code 2,
    Ctrl-C into exit code 130; ``--debug``, before or after the command, shows the traceback instead."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--debug" in args[1:]:  # accepted after the subcommand too
            args = ["--debug"] + [a for a in args if a != "--debug"]
        self.as_json = "--json" in args
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
            if getattr(self, "as_json", False):
                click.echo(json.dumps({"error": message, "kind": type(e).__name__, "where": e.where, "setting": e.setting and flag_of(e.setting)}))
            click.echo(f"error: {message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if ctx.params.get("debug"):
                raise
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)


def options_for(cls, prefix: str = "", skip: tuple[str, ...] = ()):
    """A decorator adding a click option for every CLI-visible field of the settings dataclass ``cls``:
    ``--{prefix}{field-name}``, its help, default and choices taken from the field."""
    opts = []
    for f in fields(cls):
        md = f.metadata
        if not md.get("cli", False) or f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        if prefix:
            FLAGS[f.name] = flag
        decls = [flag] + ([md["short"]] if md.get("short") else [])
        dest = (prefix + f.name).replace("-", "_")
        default = f.default if f.default is not MISSING else None
        if isinstance(default, bool):
            opts.append(click.option(*decls, dest, is_flag=True, default=default, help=md["help"]))
            continue
        kind = click.Choice(md["choices"]) if md.get("choices") else (type(default) if default is not None else int)
        opts.append(click.option(*decls, dest, default=default, type=kind, show_default=default is not None, help=md["help"]))

    def decorate(f):
        for option in reversed(opts):
            f = option(f)
        return f

    return decorate


def settings_from(cls, options: dict, prefix: str = ""):
    """Build ``cls`` from the CLI's parsed ``options``, taking (and removing) the keys it owns."""
    names = [f.name for f in fields(cls) if f.metadata.get("cli", False)]
    key = prefix.replace("-", "_")
    return cls(**{n: options.pop(key + n) for n in names if key + n in options})


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
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def _terminate(signum, frame):
    # SIGTERM unwinds like an exception, so temporary output is removed; the exit code says why (128 + 15).
    raise SystemExit(143)


token_option = click.option("--token", default=None, help="Hugging Face token for private or gated Hub ids [default: HF_TOKEN or the saved login].")
format_option = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default=None, help="Force the input format instead of detecting it."
)


@main.command()
@click.argument("path")
@click.option("--threshold", default=RankSettings.threshold, show_default=True, type=float, help="SARA threshold m for the effective rank.")
@format_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print stable JSON instead of a table.")
def inspect(path: str, threshold: float, fmt: str | None, token: str | None, as_json: bool) -> None:
    """Show what the adapter at PATH (a path or Hub id) holds: format, shapes, ranks, sizes and per-module spectra.

    PATH may also be a collection (made by `pack`): its adapters, their errors and bytes, the bank and totals.
    """
    from .collection import is_collection
    from .inspection import inspect_adapter

    if is_collection(path):
        print_collection(path, as_json)
        return
    info = inspect_adapter(path, threshold=threshold, format=fmt, token=token)
    if as_json:
        emit_json(info.to_json())
        return
    vb = info.vector_bank
    click.echo(f"file:        {info.file}")
    click.echo(f"format:      {info.format}" + (f" (N={vb['num_vectors']}, L={vb['vector_length']}, k={vb['topk']})" if vb else ""))
    click.echo(f"base model:  {info.base_model or '-'}    task: {info.task_type or '-'}    dtype: {info.dtype}")
    click.echo(f"modules:     {info.num_modules}    rank(s): {', '.join(map(str, info.ranks))}")
    click.echo(f"LoRA:        {info.lora_params:,} params, {fmt_bytes(info.stored_bytes)} stored ({fmt_bytes(info.fp16_bytes)} at fp16)")
    click.echo(f"carried:     {info.carried_params:,} params, {fmt_bytes(info.carried_bytes)} ({len(info.carried_keys)} tensors)")
    rows = [
        [m.name, f"{m.out}x{m.inp}", m.r, fmt_num(m.scale), fmt_num(m.norm), fmt_num(m.sigma_max), fmt_num(m.effective_rank, "d"),
         fmt_num(m.top_energy, ".2f"), "NaN/Inf" if m.nonfinite else ("zero" if m.zero else "")]
        for m in info.modules
    ]  # fmt: skip
    click.echo()
    print_table(["module", "out x in", "r", "scale", "|dW|_F", "sigma_max", f"eff.rank@{threshold:g}", "top1", "note"], rows)
    if info.zero_modules:
        click.echo(f"\n{len(info.zero_modules)} module(s) are all zero (ΔW = 0).")
    if info.nonfinite_modules:
        click.echo(f"\nwarning: {len(info.nonfinite_modules)} module(s) hold NaN/Inf: this adapter is broken.", err=True)


def progress_bar():
    """A stderr progress callback for the bank fit and calibration (tqdm), closed by the caller.

    Off when HF_HUB_DISABLE_PROGRESS_BARS or TQDM_DISABLE is set, as users of the Hugging Face tools expect.
    """
    import os

    from tqdm import tqdm

    bars: dict[str, tqdm] = {}
    off = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"))

    def update(stage: str, i: int, total: int, value: float) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=f"{stage:9s}", unit="step", leave=False, file=sys.stderr, disable=off)
        bar.n = i
        # calibration reports √(loss), where the loss is the distance to the teacher over the adapter's effect
        bar.set_postfix_str(f"loss {value:.4f}" if stage == "calibrate" else f"ΔW error {value:.4f}", refresh=False)
        bar.refresh()

    update.close = lambda: [b.close() for b in bars.values()]
    return update


def lora2vb_options(f):
    for option in reversed([
        click.option("-o", "--out", required=True, help="Output directory (a PEFT VB-LoRA adapter, vbcompress.json and a model card)."),
        options_for(FitSettings, skip=("code_refine_steps",)),
        options_for(OutputSettings),
        click.option("--base", default=None, help="Base model directory or Hub id: after the weight fit, calibrate on the adapter's function."),
        click.option("--calibration", "texts", default=None, help="Calibration text: one sample per line, or JSONL with 'text' [default: data-free]."),
        options_for(CalibrationSettings, prefix="calib-"),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        format_option,
        token_option,
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]):  # fmt: skip
        f = option(f)
    return f


def run_lora2vb(run, src: str, options: dict, **extra):
    """Call ``run`` (lora2vb or compress_from_hub) with the CLI's options, a progress bar unless --json."""
    as_json, out = options.pop("as_json"), options["out"]
    fit, output = settings_from(FitSettings, options), settings_from(OutputSettings, options)
    calibration = settings_from(CalibrationSettings, options, prefix="calib-")
    options["format"] = options.pop("fmt")
    bar = None if as_json else progress_bar()
    try:
        report = run(src, options.pop("out"), fit, output=output, calibration=calibration, progress=bar, **options, **extra)
    finally:
        if bar:
            bar.close()
    emit_json(report.to_json()) if as_json else print_lora2vb_report(report, out)
    return report


def print_lora2vb_report(report, out: str) -> None:
    b, fit, svd = report.bytes, report.fit, report.svd_baseline
    click.echo(f"wrote {out}  (N={fit.num_vectors}, L={fit.vector_length}, k={fit.topk}, r={fit.rank})")
    click.echo(f"size:      {fmt_bytes(b.vb)} = {b.ratio:.1%} of the LoRA at fp16 ({fmt_bytes(b.source_fp16)}); bank {fmt_bytes(b.bank)}, codes {fmt_bytes(b.codes)}")
    if b.carried:
        click.echo(f"carried:   {fmt_bytes(b.carried)} of non-LoRA tensors (heads), copied as they were")
    click.echo(f"ΔW error:  {fmt_num(report.total_rel_error, '.4f')}  (relative Frobenius, all modules)")
    click.echo(f"SVD truncation to rank {svd.rank} at ≤ the same bytes: error {svd.rel_error:.4f}")
    cal = report.calibration
    if cal and cal.retention_after and cal.retention_before:
        before, after = cal.retention_before, cal.retention_after
        if after.kl_retention is not None:
            kept = (f"KL retention {fmt_num(before.kl_retention, '.3f')} → {fmt_num(after.kl_retention, '.3f')}, "
                    f"top-1 agreement {fmt_num(after.top1_agreement, '.3f')}")  # fmt: skip
        else:
            kept = f"effect retention {fmt_num(before.effect_retention, '.3f')} → {fmt_num(after.effect_retention, '.3f')}, cosine {fmt_num(after.mean_cosine, '.4f')}"
        click.echo(f"calibrated on {cal.samples - cal.heldout_samples} samples ({cal.data}) in {fmt_num(cal.seconds, '.0f')} s; "
                   f"on {cal.heldout_samples} held-out: {kept}")
    if report.svd_keeps_more:
        click.echo("note: plain SVD truncation keeps more of this adapter at this size (try `--rank`, a larger N, or calibration).")


@main.command()
@click.argument("src")
@lora2vb_options
def lora2vb(src, **options):
    """Distill the LoRA at SRC (a path or Hub id) into one vector bank; write a PEFT VB-LoRA adapter to OUT.

    Output size: the bank (N × L values) plus, per sub-vector of length L, k indices and k−1 weights.

    \b
    Examples:
      vbcompress lora2vb examples/gpt2-tigrinya-causal -o out/vb -N 1024            # seconds
      vbcompress lora2vb LORA -o out/cal -N 256 --base BASE_MODEL --calibration FILE  # minutes on CPU
    """
    from .compress import lora2vb as run

    run_lora2vb(run, src, options)


@main.command()
@click.argument("repo_id")
@lora2vb_options
@click.option("--push-to", default=None, help="Upload OUT to this Hub repository (created if missing) and print its URL.")
@click.option("--private", is_flag=True, help="Create the --push-to repository as private.")
def hub(repo_id, push_to, private, **options):
    """Download the LoRA REPO_ID[@REVISION] from the Hub, shrink it like lora2vb, write OUT ready to publish.

    Only the adapter's files and model card are fetched, into the Hugging Face cache (HF_HUB_OFFLINE=1 works
    from it, also when PEFT filled it). --base may also be a Hub id.

    \b
    Example:
      vbcompress hub someone/their-lora -o out/their-lora-vb -N 256 --push-to me/their-lora-vb
    """
    from .compress import compress_from_hub

    as_json = options["as_json"]
    report = run_lora2vb(compress_from_hub, repo_id, options, push_to=push_to, private=private)
    if report.pushed and not as_json:
        click.echo(f"pushed:    {report.pushed.url}  ({report.pushed.commit_url})")


@main.command(name="eval")
@click.argument("ref")
@click.argument("cand")
@click.option("--base", default=None, help="Base model directory or Hub id, for effect retention on --data.")
@click.option("--data", default=None, help="Text inputs (lines or JSONL with 'text') for effect retention.")
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(ref: str, cand: str, base: str | None, data: str | None, token: str | None, as_json: bool) -> None:
    """ΔW error of adapter CAND against adapter REF (any readable formats), per module and in total, and sizes.

    With --base and --data: effect retention 1 − ‖f_cand − f_ref‖ / ‖f_ref − f_base‖ and mean cosine of outputs.
    """
    from .evaluate import evaluate

    result = evaluate(ref, cand, base=base, data=data, token=token)
    if as_json:
        emit_json(result.to_json())
        return
    d, s = result.delta, result.sizes
    rows = [[m.name, fmt_num(m.ref_norm), fmt_num(m.abs_error), fmt_num(m.rel_error, ".4f")] for m in d.modules]
    print_table(["module", "|dW_ref|", "|dW_cand - dW_ref|", "rel.error"], rows)
    for what in ("missing", "extra"):
        if getattr(d, what):
            click.echo(f"{what} in CAND: {', '.join(getattr(d, what))}")
    click.echo(f"\ntotal ΔW error: {fmt_num(d.total_rel_error, '.4f')}")
    if result.function is not None:
        f = result.function
        if f.kl_retention is not None or f.perplexity is not None:
            ppl = f.perplexity or {}
            click.echo(f"KL retention: {fmt_num(f.kl_retention, '.4f')}   top-1 agreement: {fmt_num(f.top1_agreement, '.4f')}   ({f.samples} inputs, {f.tokens} tokens)")
            click.echo("perplexity: " + "   ".join(f"{k} {fmt_num(v, '.2f')}" for k, v in ppl.items()))
        else:
            click.echo(f"effect retention: {fmt_num(f.effect_retention, '.4f')}   mean cosine: {fmt_num(f.mean_cosine, '.4f')}   ({f.samples} inputs)")
    ratio = f"{s.ratio_vs_ref_fp16:.1%}" if s.ratio_vs_ref_fp16 is not None else "-"
    click.echo(f"size: REF {fmt_bytes(s.ref_bytes)} stored ({fmt_bytes(s.ref_fp16_bytes)} at fp16), CAND {fmt_bytes(s.cand_bytes)} = {ratio} of REF at fp16")


def rank_value(value: str | None):
    if value is None or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither an integer nor 'auto'") from None


def print_rank_report(report, out: str) -> None:
    rows = [[m.name, m.source_rank, m.rank, f"{m.retained_fro:.1%}", f"{m.retained_sigma:.1%}"] for m in report.modules]
    print_table(["module", "r in", "r out", "kept ‖ΔW‖_F", "kept Σσ"], rows)
    click.echo(f"\nwrote {out}: kept {report.retained_fro:.2%} of ‖ΔW‖_F (ΔW error {report.rel_error:.4f}); "
               f"{fmt_bytes(report.bytes_before)} → {fmt_bytes(report.bytes_after)}")


to_option = click.option(
    "--to", type=click.Choice(DENSE_FORMATS), default=None,
    help="Write the dense LoRA as PEFT, kohya (one .safetensors for ComfyUI/A1111) or diffusers [default: the source's own family; PEFT for others].",
)  # fmt: skip


def dense_options(f):
    for option in reversed([
        click.option("-o", "--out", required=True, help="Output directory (the LoRA in the --to format)."),
        to_option,
        options_for(RankSettings),
        click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
        format_option,
        token_option,
        click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
    ]):  # fmt: skip
        f = option(f)
    return f


def run_dense(src, rank, options: dict) -> None:
    from .dense import to_lora

    settings, as_json, out = settings_from(RankSettings, options), options.pop("as_json"), options.pop("out")
    report = to_lora(src, out, rank_value(rank), settings, format=options.pop("fmt"), **options)
    emit_json(report.to_json()) if as_json else print_rank_report(report, f"{out}/{report.file} ({report.written_format})")


@main.command()
@click.argument("src")
@click.option("--rank", default=None, help="Integer cap for every module, or 'auto' (per-module by --rule) [default: full rank, exact].")
@dense_options
def vb2lora(src, rank, **options):
    """Convert any readable adapter at SRC (VB-LoRA, LoRA, kohya, diffusers, mlx-lm) to a dense LoRA in OUT.

    \b
    Examples:
      vbcompress vb2lora out/minilm-vb -o out/minilm-lora
      vbcompress vb2lora anime-vb -o anime-kohya --to kohya --rank auto
    """
    run_dense(src, rank, options)


@main.command()
@click.argument("src")
@click.option("--rank", required=True, help="Integer cap for every module, or 'auto' (per-module by --rule).")
@dense_options
def resize(src, rank, **options):
    """Lower the rank of the LoRA at SRC without retraining (also rank-2r LoRA-GA checkpoints).

    \b
    Examples:
      vbcompress resize lora_dir -o lora_r8 --rank 8
      vbcompress resize anime.safetensors -o anime-small --rank auto --rule fro --threshold 0.9
    """
    run_dense(src, rank, options)


@main.command()
@click.option("--base", required=True, help="Base model directory or Hub id (model.safetensors, or sharded with an index).")
@click.option("--adapter", "adapter_src", required=True, help="Adapter to fold in (LoRA, VB-LoRA, kohya, diffusers; path or Hub id).")
@click.option("-o", "--out", required=True, help="Output model directory.")
@options_for(MergeSettings)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def merge(base, adapter_src, out, overwrite, token, as_json, **options):
    """Fold an adapter into base weights shard by shard and write a full model to OUT."""
    from .merge import merge as run

    report = run(base, adapter_src, out, settings_from(MergeSettings, options), overwrite=overwrite, token=token)
    if as_json:
        emit_json(report.to_json())
        return
    click.echo(f"wrote {out}: {report.merged_modules} weights merged, {report.replaced_tensors} replaced by the adapter's heads, "
               f"{report.shards} shard(s), {len(report.copied_files)} other file(s) copied")


def print_collection(path: str, as_json: bool) -> None:
    from .collection import Collection, collection_summary

    coll = Collection(path)
    info = collection_summary(coll)
    if as_json:
        emit_json(info)
        return
    st = info["settings"]
    click.echo(f"collection:  {path}  (format {info['format_version']}, base model {info['base_model'] or '-'})")
    click.echo(f"bank:        N={st['num_vectors']}, L={st['vector_length']}, k={st['topk']}, {st['bank_dtype']}: {fmt_bytes(info['bank_bytes'])}")
    rows = [[name, e.source, e.source_sha256[:12], e.rank, fmt_num(e.rel_error, ".4f"), fmt_bytes(e.marginal_bytes),
             fmt_bytes(e.source_fp16_bytes), e.added_by + (" +cal" if e.calibrated else "")] for name, e in coll.entries.items()]  # fmt: skip
    click.echo()
    print_table(["adapter", "source", "sha256", "r", "ΔW error", "marginal", "source fp16", "added"], rows)
    ratio = f"{info['ratio_vs_sources_fp16']:.1%}" if info["ratio_vs_sources_fp16"] else "-"
    click.echo(f"\ntotal:       {fmt_bytes(info['total_bytes'])} for {len(rows)} adapter(s) = {ratio} of the sources at fp16 "
               f"({fmt_bytes(info['sources_fp16_bytes'])}); {fmt_bytes(info['disk_bytes'])} on disk")


def print_entries(entries, verb: str) -> None:
    for e in entries:
        click.echo(f"{verb} {e.name}: ΔW error {fmt_num(e.rel_error, '.4f')}, {fmt_bytes(e.marginal_bytes)} "
                   f"({e.marginal_bytes / e.source_fp16_bytes:.1%} of its LoRA at fp16), rank {e.rank}")
        if e.rel_error is not None and e.rel_error >= 0.9:
            click.echo(f"note: the bank keeps almost nothing of {e.name} (ΔW error {e.rel_error:.3f}; 1.0 is an empty adapter): "
                       "its weights share little with what the bank was fitted to. A bank of its own, or int4 factors, keeps more.")


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Collection directory to create.")
@click.option("--name", "names", multiple=True, help="Name of each source in order (repeat) [default: folder/file stem or Hub repo name].")
@options_for(FitSettings, skip=("code_refine_steps",))
@options_for(OutputSettings, skip=("full_logits",))
@click.option("--allow-mixed-bases", is_flag=True, help="Pack adapters whose configs name different base models.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier output.")
@format_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print the collection summary as JSON.")
def pack(sources, out, names, allow_mixed_bases, overwrite, fmt, token, as_json, **options):
    """Fit ONE vector bank jointly to every adapter in SOURCES (paths or Hub ids of one base) and write a collection.

    The bank is paid for once; each adapter then costs only its codes. Each adapter weighs equally in the
    fit (relative ΔW error). Add more later with `add`, get PEFT adapters back with `unpack`.
    """
    from .collection import collection_summary
    from .collection import pack as run

    fit, output = settings_from(FitSettings, options), settings_from(OutputSettings, options)
    bar = None if as_json else progress_bar()
    try:
        coll = run(list(sources), out, fit, output=output, names=list(names) or None, allow_mixed_bases=allow_mixed_bases,
                   format=fmt, overwrite=overwrite, token=token, progress=bar)  # fmt: skip
    finally:
        if bar:
            bar.close()
    if as_json:
        emit_json(collection_summary(coll))
        return
    print_entries(coll.entries.values(), "packed")
    print_collection(out, False)


def read_list(path: str) -> list[str]:
    """Sources from a file: one path or Hub id per line; blank lines and # comments are skipped."""
    from .errors import FormatError

    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(path, f"cannot read the source list ({e.__class__.__name__})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def batch_bar(total: int):
    """One stderr bar for a batch: done / failed / skipped and adapters per minute; failures as lines."""
    import os
    import time

    from tqdm import tqdm

    off = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"))
    bar = tqdm(total=total, desc="add", unit="adapter", file=sys.stderr, disable=off)
    start = time.monotonic()

    def update(outcome, report) -> None:
        if outcome.status == "failed":
            tqdm.write(f"error: {outcome.error.render(flag_of)}", file=sys.stderr)
        bar.update(1)
        rate = 60 * bar.n / max(time.monotonic() - start, 1e-9)
        bar.set_postfix_str(f"added {len(report.added)}, skipped {len(report.skipped)}, failed {len(report.failed)}, {rate:.1f}/min")

    update.close = bar.close
    return update


@main.command()
@click.argument("collection")
@click.argument("sources", nargs=-1)
@click.option("--from-list", "from_list", default=None, help="A file with one source (path or Hub id) per line, added after SOURCES.")
@click.option("--name", "names", multiple=True, help="Name of each source in order (repeat) [default: folder/file stem or Hub repo name].")
@options_for(FitSettings, skip=("num_vectors", "vector_length", "topk", "rank", "iters", "refine_steps"))
@click.option("--workers", default=1, show_default=True, type=int, help="Encode in a local pool of this many processes (this process writes).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
              help="Encode as Ray tasks: --ray for a local Ray, --ray ADDRESS for a cluster (pip install 'vbcompress[ray]').")
@click.option("--base", default=None, help="Base model directory or Hub id: calibrate each new adapter's logits on its function (the bank stays frozen).")
@click.option("--calibration", "texts", default=None, help="Calibration text: one sample per line, or JSONL with 'text' [default: data-free].")
@options_for(CalibrationSettings, prefix="calib-")
@click.option("--allow-mixed-bases", is_flag=True, help="Add adapters whose configs name another base model.")
@format_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print what was added, skipped and failed as JSON.")
def add(collection, sources, from_list, names, workers, ray_address, base, texts, allow_mixed_bases, fmt, token, as_json, **options):
    """Encode each adapter in SOURCES against the frozen bank of COLLECTION and add it (codes only).

    Each source lands or fails on its own: a failure (not found, gated, NaN, does not fit the bank) is
    printed, recorded in COLLECTION/failures.json, and the batch goes on; the exit code is 2 if any failed.
    Re-running the same command skips what is already in (same source, same weights hash) and retries the
    failures, so a killed batch resumes where it stopped.
    """
    from .collection import add as run

    sources = list(sources) + (read_list(from_list) if from_list else [])
    if not sources:
        raise click.UsageError("name at least one source, or --from-list FILE")
    fit, calibration = settings_from(FitSettings, options), settings_from(CalibrationSettings, options, prefix="calib-")
    single = len(sources) == 1
    bar = None if as_json else (progress_bar() if single else batch_bar(len(sources)))
    try:
        report = run(collection, sources, names=list(names) or None, fit=fit, base=base, calibration=calibration, texts=texts,
                     allow_mixed_bases=allow_mixed_bases, format=fmt, token=token, keep_going=True, workers=workers,
                     ray_address=ray_address, progress=bar if single else None, on_outcome=None if single or not bar else bar)  # fmt: skip
    finally:
        if bar:
            bar.close()
    if as_json:
        emit_json(report.to_json())
    else:
        print_entries(report.added, "added")
        if report.skipped:
            click.echo(f"skipped {len(report.skipped)} source(s) already in the collection")
        if single and report.failed:
            click.echo(f"error: {report.failed[0].outcome.error.render(flag_of)}", err=True)
        elif report.failed:
            click.echo(f"{len(report.failed)} source(s) failed (listed in {collection}/failures.json); re-run the same command to retry them")
    if report.failed:
        sys.exit(2)


@main.command()
@click.argument("collection")
@click.argument("names", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Output directory: the adapter for one NAME, OUT/NAME for several.")
@click.option("--dense", is_flag=True, help="Write a dense LoRA instead of VB-LoRA (rank rules as vb2lora).")
@click.option("--rank", default=None, help="With --dense: integer cap, or 'auto' (per-module by --rule) [default: full rank, exact].")
@to_option
@options_for(RankSettings)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an earlier output.")
def unpack(collection, names, out, dense, rank, to, overwrite, **options):
    """Write adapters NAMES of COLLECTION as PEFT VB-LoRA adapters (bank included) that PEFT loads."""
    from .collection import Collection

    paths = Collection(collection).unpack(list(names), out, dense=dense, rank=rank_value(rank),
                                          rank_settings=settings_from(RankSettings, options), overwrite=overwrite, to=to)  # fmt: skip
    for name, path in zip(names, paths):
        click.echo(f"wrote {path}  ({name}, {'dense LoRA' if dense else 'VB-LoRA'})")


@main.command()
@click.argument("collection")
@click.argument("names", nargs=-1, required=True)
def remove(collection, names):
    """Remove adapters NAMES from COLLECTION (the bank stays as it is)."""
    from .collection import remove as run

    run(collection, list(names))
    click.echo(f"removed {', '.join(names)} from {collection}")


if __name__ == "__main__":
    main()
