"""Commands on one adapter: ``inspect``, ``lora2vb``, ``hub``, ``eval``, ``vb2lora``, ``resize``, ``merge``."""

from __future__ import annotations

import click

from ..settings import CalibrationSettings, FitSettings, MergeSettings, OutputSettings, RankSettings, SizeSettings
from ..units import fmt_bytes
from .options import (
    base_option,
    format_option,
    json_option,
    overwrite_option,
    rank_value,
    settings_options,
    stack,
    texts_option,
    to_option,
    token_option,
)
from .progress import closing, progress_bar
from .sink import Sink, fmt_num, print_table


@click.command()
@click.argument("path")
@click.option("--threshold", default=RankSettings.threshold, show_default=True, type=float, help="SARA threshold m for the effective rank.")
@format_option
@token_option
@json_option
def inspect(path: str, threshold: float, fmt: str | None, token: str | None, as_json: bool) -> None:
    """Show what the adapter at PATH (a path or Hub id) holds: format, shapes, ranks, sizes and per-module spectra.

    PATH may also be a collection (made by `pack`): its adapters, their errors and bytes, the bank and totals.
    """
    from ..collection import inspect_collection, is_collection
    from ..inspection import inspect_adapter
    from .collections import print_collection

    if is_collection(path):
        Sink(as_json).result(inspect_collection(path), print_collection)
        return
    Sink(as_json).result(inspect_adapter(path, threshold=threshold, format=fmt, token=token), print_inspection)


def print_inspection(info) -> None:
    vb = info.vector_bank
    click.echo(f"file:        {info.file}")
    click.echo(f"format:      {info.format}" + (f" (N={vb['num_vectors']}, L={vb['vector_length']}, k={vb['topk']})" if vb else ""))
    click.echo(f"base model:  {info.base_model or '-'}    task: {info.task_type or '-'}    dtype: {info.dtype}")
    click.echo(f"modules:     {info.num_modules}    rank(s): {', '.join(map(str, info.ranks))}")
    click.echo(f"LoRA:        {info.lora_params:,} params, {fmt_bytes(info.stored_bytes)} stored ({fmt_bytes(info.fp16_bytes)} at fp16)")
    click.echo(f"carried:     {info.carried_params:,} params, {fmt_bytes(info.carried_bytes)} ({len(info.carried_keys)} tensors)")
    rows = [
        [
            m.name,
            f"{m.out}x{m.inp}",
            m.r,
            fmt_num(m.scale),
            fmt_num(m.norm),
            fmt_num(m.sigma_max),
            fmt_num(m.effective_rank, "d"),
            fmt_num(m.top_energy, ".2f"),
            "NaN/Inf" if m.nonfinite else ("zero" if m.zero else ""),
        ]
        for m in info.modules
    ]
    click.echo()
    print_table(["module", "out x in", "r", "scale", "|dW|_F", "sigma_max", f"eff.rank@{info.threshold:g}", "top1", "note"], rows)
    if info.zero_modules:
        click.echo(f"\n{len(info.zero_modules)} module(s) are all zero (ΔW = 0).")
    if info.nonfinite_modules:
        click.echo(f"\nwarning: {len(info.nonfinite_modules)} module(s) hold NaN/Inf: this adapter is broken.", err=True)


lora2vb_options = stack(
    click.option("-o", "--out", default=None, help="Output directory (a PEFT VB-LoRA adapter, vbcompress.json and a model card)."),
    settings_options(FitSettings, "fit", skip=("code_refine_steps",)),
    settings_options(OutputSettings, "output"),
    settings_options(SizeSettings, "size"),
    base_option,
    texts_option,
    settings_options(
        CalibrationSettings, "calibration", skip=("code_steps", "warm_steps", "code_lr", "gradient_start")
    ),  # lora2vb trains the bank too
    overwrite_option,
    format_option,
    token_option,
    json_option,
)


def run_lora2vb(run, src: str, out: str, fmt: str | None, as_json: bool, **options):
    """Call ``run`` (lora2vb or compress_from_hub) with a progress bar unless --json; print the report."""
    if options["size"].dry_run:
        report = run(src, out, format=fmt, **options)
        Sink(as_json).result(report, print_dry_run)
        return report
    with closing(None if as_json else progress_bar()) as bar:
        report = run(src, out, format=fmt, progress=bar, **options)
    Sink(as_json).result(report, lambda r: print_lora2vb_report(r, out))
    return report


def print_dry_run(report) -> None:
    click.echo(
        f"{report.source}: L={report.vector_length}, k={report.topk}, r={report.rank}; the LoRA at fp16 is {fmt_bytes(report.source_fp16_bytes)}"
    )
    rows = [
        [
            row.num_vectors,
            fmt_bytes(row.bytes),
            f"{row.ratio:.1%}",
            row.plain.name if row.plain else "nothing fits",
            fmt_num(row.plain.rel_error if row.plain else None, ".3f"),
        ]
        for row in report.rows
    ]
    print_table(["N", "bytes", "of fp16", "best plain in these bytes", "its ΔW error"], rows)
    if report.chosen:
        click.echo(f"\nthe byte budget chooses N={report.chosen}")
    click.echo("nothing was fitted or written; to be worth its bytes, a bank must keep more than the plain figure at its N")


def print_lora2vb_report(report, out: str) -> None:
    b, fit, svd = report.bytes, report.fit, report.svd_baseline
    click.echo(f"wrote {out}  (N={fit.num_vectors}, L={fit.vector_length}, k={fit.topk}, r={fit.rank})")
    if report.search:
        tries = ", ".join(f"N={t['num_vectors']} {fmt_num(t['retention'], '.3f')}" for t in report.search)
        if any(t["met"] for t in report.search):
            click.echo(f"target:    N={fit.num_vectors} is the smallest N that keeps ≥ {report.search_target} (tried {tries})")
        else:
            click.echo(f"warning: no N up to {fit.num_vectors} keeps {report.search_target}; this is the closest (tried {tries})")
    if report.verdict is not None:
        print_verdict(report.verdict)
    click.echo(
        f"size:      {fmt_bytes(b.vb)} = {b.ratio:.1%} of the LoRA at fp16 ({fmt_bytes(b.source_fp16)}); "
        f"bank {fmt_bytes(b.bank)}, codes {fmt_bytes(b.codes)}"
    )
    if b.carried:
        click.echo(f"carried:   {fmt_bytes(b.carried)} of non-LoRA tensors (heads), copied as they were")
    click.echo(f"ΔW error:  {fmt_num(report.total_rel_error, '.4f')}  (relative Frobenius, all modules)")
    click.echo(f"SVD truncation at fp16 to rank {svd.rank} in ≤ the same bytes: error {svd.rel_error:.4f}")
    cal = report.calibration
    if cal and cal.retention_after and cal.retention_before:
        before, after = cal.retention_before, cal.retention_after
        if after.kl_retention is not None:
            kept = (
                f"KL retention {fmt_num(before.kl_retention, '.3f')} → {fmt_num(after.kl_retention, '.3f')}, "
                f"top-1 agreement {fmt_num(after.top1_agreement, '.3f')}"
            )
        else:
            kept = (
                f"effect retention {fmt_num(before.effect_retention, '.3f')} → {fmt_num(after.effect_retention, '.3f')}, "
                f"cosine {fmt_num(after.mean_cosine, '.4f')}"
            )
        click.echo(
            f"calibrated on {cal.samples - cal.heldout_samples} samples ({cal.data}) in {fmt_num(cal.seconds, '.0f')} s; "
            f"on {cal.heldout_samples} held-out: {kept}"
        )


def print_verdict(verdict) -> None:
    """The verdict first: a warning when a plain representation keeps more, or when the output keeps little."""
    if verdict.kind == "plain" or verdict.keeps != "much":
        click.echo(f"warning: {verdict.line}")
    else:
        click.echo(f"verdict:   {verdict.line}")


@click.command()
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
    from ..compress import lora2vb as lora2vb_

    run_lora2vb(lora2vb_, src, **options)


@click.command()
@click.argument("repo_id")
@lora2vb_options
@click.option("--push-to", default=None, help="Upload OUT to this Hub repository (created if missing) and print its URL.")
@click.option("--private", is_flag=True, help="Create the --push-to repository as private.")
def hub(repo_id, **options):
    """Download the LoRA REPO_ID[@REVISION] from the Hub, shrink it like lora2vb, write OUT ready to publish.

    Only the adapter's files and model card are fetched, into the Hugging Face cache (HF_HUB_OFFLINE=1 works
    from it, also when PEFT filled it). --base may also be a Hub id.

    \b
    Example:
      vbcompress hub someone/their-lora -o out/their-lora-vb -N 256 --push-to me/their-lora-vb
    """
    from ..compress import compress_from_hub

    as_json = options["as_json"]
    report = run_lora2vb(compress_from_hub, repo_id, **options)
    if report.pushed and not as_json:
        click.echo(f"pushed:    {report.pushed.url}  ({report.pushed.commit_url})")


@click.command(name="eval")
@click.argument("ref")
@click.argument("cand")
@click.option("--base", default=None, help="Base model directory or Hub id, for effect retention on --data.")
@click.option("--data", default=None, help="Text inputs (lines or JSONL with 'text') for effect retention.")
@token_option
@json_option
def eval_cmd(ref: str, cand: str, base: str | None, data: str | None, token: str | None, as_json: bool) -> None:
    """ΔW error of adapter CAND against adapter REF (any readable formats), per module and in total, and sizes.

    With --base and --data: effect retention 1 − ‖f_cand − f_ref‖ / ‖f_ref − f_base‖ and mean cosine of outputs.
    """
    from ..evaluate import evaluate

    with closing(None if as_json else progress_bar()) as bar:
        report = evaluate(ref, cand, base=base, data=data, token=token, progress=bar)
    Sink(as_json).result(report, print_eval)


def print_eval(result) -> None:
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
            click.echo(
                f"KL retention: {fmt_num(f.kl_retention, '.4f')} (the base alone: 0)   top-1 agreement: {fmt_num(f.top1_agreement, '.4f')} "
                f"(the base alone: {fmt_num(f.base_top1_agreement, '.4f')})   ({f.samples} inputs, {f.tokens} tokens)"
            )
            click.echo("perplexity: " + "   ".join(f"{k} {fmt_num(v, '.2f')}" for k, v in ppl.items()))
        else:
            click.echo(
                f"effect retention: {fmt_num(f.effect_retention, '.4f')}   mean cosine: {fmt_num(f.mean_cosine, '.4f')}   ({f.samples} inputs)"
            )
    # like with like: stored against stored, then against the fp16 LoRA every ratio in the tool is taken of
    vs_stored = f" = {s.cand_bytes / s.ref_bytes:.1%} of REF as stored" if s.ref_bytes else ""
    vs_fp16 = (
        f", {s.ratio_vs_ref_fp16:.1%} of REF's LoRA at fp16 ({fmt_bytes(s.ref_fp16_bytes)})" if s.ratio_vs_ref_fp16 is not None else ""
    )
    click.echo(f"size: REF {fmt_bytes(s.ref_bytes)} stored, CAND {fmt_bytes(s.cand_bytes)} stored{vs_stored}{vs_fp16}")
    if result.verdict is not None:
        print_verdict(result.verdict)


def print_rank_report(report, out: str) -> None:
    rows = [[m.name, m.source_rank, m.rank, f"{m.retained_fro:.1%}", f"{m.retained_sigma:.1%}"] for m in report.modules]
    print_table(["module", "r in", "r out", "kept ‖ΔW‖_F", "kept Σσ"], rows)
    click.echo(
        f"\nwrote {out if out.endswith('.safetensors') else f'{out}/{report.file}'} ({report.written_format}): kept {report.retained_fro:.2%} of ‖ΔW‖_F "
        f"(ΔW error {report.rel_error:.4f}); {fmt_bytes(report.bytes_before)} → {fmt_bytes(report.bytes_after)}"
    )


dense_options = stack(
    click.option(
        "-o", "--out", required=True, help="Output directory (the LoRA in the --to format), or NAME.safetensors for one kohya file."
    ),
    to_option,
    settings_options(RankSettings, "settings"),
    overwrite_option,
    format_option,
    token_option,
    json_option,
)


def run_dense(src, rank, out, fmt, as_json, **options) -> None:
    from ..dense import to_lora

    Sink(as_json).result(to_lora(src, out, rank_value(rank), format=fmt, **options), lambda r: print_rank_report(r, out))


@click.command()
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
    run_dense(src, rank, **options)


@click.command()
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
    run_dense(src, rank, **options)


@click.command()
@click.option("--base", required=True, help="Base model directory or Hub id (model.safetensors, or sharded with an index).")
@click.option("--adapter", "adapter_src", required=True, help="Adapter to fold in (LoRA, VB-LoRA, kohya, diffusers; path or Hub id).")
@click.option("-o", "--out", required=True, help="Output model directory.")
@settings_options(MergeSettings, "settings")
@overwrite_option
@token_option
@json_option
def merge(base, adapter_src, out, settings, overwrite, token, as_json):
    """Fold an adapter into base weights shard by shard and write a full model to OUT."""
    from ..merge import merge as merge_

    report = merge_(base, adapter_src, out, settings, overwrite=overwrite, token=token)
    Sink(as_json).result(
        report,
        lambda r: click.echo(
            f"wrote {out}: {r.merged_modules} weights merged, {r.replaced_tensors} replaced by the adapter's heads, "
            f"{r.shards} shard(s), {len(r.copied_files)} other file(s) copied"
        ),
    )
