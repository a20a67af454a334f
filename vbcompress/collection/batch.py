"""``add`` and ``remove``: many sources into one collection, each landing or failing on its own.

Encoding is one function of (job, bank) mapped over the sources by an executor (inline, a local process
pool, or Ray tasks); only the driver writes, one source at a time, so a failure or kill loses at most the
adapters in flight.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..basemodel import Base
from ..errors import FormatError, OutputError, SettingError, VBCompressError
from ..hub import resolve
from ..settings import CalibrationSettings, FitSettings, Progress, QualitySettings, resolve_device
from .encode import Encoded, Judging, check_sources_fit, encode_one, load_source, write_encoded
from .growth import grow, ungrow
from .store import ADAPTERS, Entry, Store
from .writes import adapters_folder, clean_debris, discard, journal, locked, read_failures, settle, write_failures, write_manifest

ENCODING_KNOBS = ("seed", "code_refine_steps", "candidates", "partners", "device")


@dataclass(frozen=True)
class Job:
    """One source of a batch ``add``, and what encoding it needs besides the bank (picklable for workers)."""

    given: str
    name: str | None
    fit: FitSettings  # the bank's settings with the encoding knobs applied; rank = the collection's cap
    base_model: str | None
    known_sha256: str | None  # the weights hash of the entry already added from this same source, if any
    taken: frozenset[str]  # names already in the collection
    quality: QualitySettings = QualitySettings()
    allow_mixed_bases: bool = False
    format: str | None = None
    token: str | None = None
    bank_dtype: str = "float32"  # how the collection stores its bank: the dtype of any vectors the job brings


@dataclass
class Outcome:
    """What became of one source: ``added`` (with its encoding), ``skipped`` (already in), or ``failed``
    (with the error itself, which pickles across processes)."""

    given: str
    status: str
    name: str | None = None
    encoded: Encoded | None = None
    error: VBCompressError | None = None


@dataclass
class Failure:
    """A source that did not land, and why (``error``: one line, in library terms)."""

    source: str
    name: str | None
    error: str
    outcome: Outcome | None = field(default=None, repr=False, compare=False)


@dataclass
class AddReport:
    """What a batch ``add`` did: entries added, sources skipped as already present, sources that failed."""

    added: list[Entry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the user should know that is no failure

    def to_json(self) -> dict:
        failed = [{"source": f.source, "name": f.name, "error": f.error} for f in self.failed]
        return {"added": [asdict(e) for e in self.added], "skipped": self.skipped, "failed": failed, "notes": self.notes}


def encode(job: Job, bank: torch.Tensor, progress: Progress | None = None, judging: Judging | None = None) -> Outcome:
    """Fetch, read, check and encode one source against ``bank`` (no writes): runs in the driver, a
    worker process or a Ray task alike, and gives the same bytes for the same seed wherever it runs.
    ``judging`` brings a base model (this process only); without it the job's floor is judged in weight space."""
    try:
        s = load_source(job.given, job.name, job.token, job.format)
        if job.known_sha256 == s.sha256:
            return Outcome(job.given, "skipped", name=s.name)
        if s.name in job.taken:
            hint = (
                " (its weights changed since it was added; remove it first, or add it under another {setting})"
                if job.known_sha256
                else " (choose another {setting})"
            )
            raise SettingError("name", f"the collection already has an adapter named {s.name!r}{hint}", where=job.given)
        check_sources_fit([s], job.base_model, {}, job.allow_mixed_bases)
        judging = judging or Judging(job.quality)
        encoded = encode_one(s, job.fit, bank, judging, progress, getattr(torch, job.bank_dtype))
        return Outcome(job.given, "added", name=s.name, encoded=encoded)
    except VBCompressError as e:
        return Outcome(job.given, "failed", name=job.name, error=e)
    except (OSError, SafetensorError, ValueError) as e:  # a source's I/O (a full disk, a bad path, a Hub id): its own failure
        first = (str(e).splitlines() or [""])[0][:160]
        return Outcome(
            job.given, "failed", name=job.name, error=FormatError(job.given, f"cannot be read or encoded ({type(e).__name__}: {first})")
        )


# ---------------------------------------------------------------- executors: map(encode, jobs)

_WORKER_BANK: torch.Tensor | None = None


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this worker when its driver dies, however it dies (SIGKILL included)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown is all there is
        pass
    if os.getppid() != parent:  # the driver died before the request: no signal will come
        os._exit(1)


def _worker_init(collection: str, threads: int, parent: int) -> None:
    global _WORKER_BANK
    _die_with_parent(parent)
    torch.set_num_threads(threads)
    _WORKER_BANK = Store(collection).bank.float()


def _worker_encode(job: Job) -> Outcome:
    return encode(job, _WORKER_BANK)


def _run_ray(jobs: list[Job], bank: torch.Tensor, address: str) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError:
        raise SettingError("ray_address", "Ray is not installed: pip install 'vbcompress[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    bank_ref = ray.put(bank)  # in the object store once; every task reads the same copy
    task = ray.remote(num_cpus=1)(encode)
    window = max(2, int(ray.available_resources().get("CPU", 1)) * 2)
    todo, pending = list(jobs), []
    try:
        while todo or pending:
            while todo and len(pending) < window:
                pending.append(task.remote(todo.pop(0), bank_ref))
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:  # a driver that stops early takes its tasks with it
            ray.cancel(ref, force=True)
        if started:  # and the local Ray it started
            ray.shutdown()


def _run_pool(jobs: list[Job], collection: Path, workers: int) -> Iterator[Outcome]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_worker_init, initargs=(str(collection), threads, os.getpid())
    ) as pool:
        futures = [pool.submit(_worker_encode, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def executor(jobs: list[Job], root: Path, bank: torch.Tensor, workers: int, ray_address: str | None, inline) -> Iterable[Outcome]:
    """The outcomes of ``encode`` over ``jobs``, in completion order, wherever they run."""
    if ray_address:
        return _run_ray(jobs, bank, ray_address)
    if workers > 1:
        return _run_pool(jobs, root, workers)
    return (inline(job) for job in jobs)


# ---------------------------------------------------------------- the driver


def add(
    collection: str | os.PathLike,
    sources: list[str | os.PathLike],
    *,
    names: list[str] | None = None,
    fit: FitSettings | None = None,
    base: str | os.PathLike | None = None,
    calibration: CalibrationSettings | None = None,
    texts: str | os.PathLike | None = None,
    quality: QualitySettings | None = None,
    allow_mixed_bases: bool = False,
    format: str | None = None,
    token: str | None = None,
    keep_going: bool = False,
    workers: int = 1,
    ray_address: str | None = None,
    progress: Progress | None = None,
    on_outcome: Callable[[Outcome, AddReport], None] | None = None,
) -> AddReport:
    """Encode each source against the collection's frozen bank and add it (codes only).

    Each source is fetched, read, checked (name, base, vector length) and encoded on its own, then committed
    on its own (its folder, then the manifest), so a failure or kill loses at most the adapters in flight.
    A source already in the collection (same source and same weights hash) is skipped, so re-running a
    batch resumes it. Failures are recorded in ``failures.json`` (and dropped from it once the source
    lands); the first failure is raised unless ``keep_going``. ``workers > 1`` encodes in a local process
    pool, ``ray_address`` (an address, or ``"local"``) as Ray tasks with the bank in the object store once;
    only this process writes. Each adapter is held the cheapest way that meets ``quality``'s floor (bank
    codes of its top directions, or low-rank factors); one that nothing meets fails with a one-line error.
    With ``base``, the floor is retention on held-out text and each new adapter's codes are calibrated on its
    function (in this process); the bank stays frozen, since other adapters use it. The bank's settings (N, L,
    k, rank cap) come from the manifest; from ``fit`` only the encoding knobs are taken (``ENCODING_KNOBS``).
    """
    quality = quality or QualitySettings()
    quality.check(base is not None)
    if texts is not None and base is None:
        raise SettingError("texts", "calibration text ({setting}) needs a base model", where=texts)
    root = Path(collection)
    Store(root)  # a clear error for a path that is no collection, before taking the lock
    if names is not None and len(names) != len(sources):
        raise SettingError("names", f"{len(names)} names for {len(sources)} sources")
    if not sources:
        raise SettingError("sources", "name at least one source adapter")
    if workers < 1:
        raise SettingError("workers", f"{{setting}} must be at least 1, not {workers}")
    if base is not None and (workers > 1 or ray_address):
        raise SettingError("base", "calibration ({setting}) runs in this process only: drop workers / Ray to calibrate")
    report = AddReport()
    with locked(root):
        coll = Store(root)
        clean_debris(root, coll.manifest)
        run = replace(coll.manifest.fit(), **{k: getattr(fit or FitSettings(), k) for k in ENCODING_KNOBS})
        by_source = {e.source: e for e in coll.entries.values()}
        jobs = [
            Job(
                given=str(g),
                name=names[i] if names else None,
                fit=run,
                base_model=coll.manifest.base_model,
                known_sha256=by_source[str(g)].source_sha256 if str(g) in by_source else None,
                taken=frozenset(coll.names),
                quality=quality,
                allow_mixed_bases=allow_mixed_bases,
                format=format,
                token=token,
                bank_dtype=str(coll.bank.dtype).removeprefix("torch."),
            )
            for i, g in enumerate(sources)
        ]
        bank = [coll.bank.float()]  # grows as adapters bring vectors; inline encodes see the newest
        failures, note = read_failures(root)
        if note:
            report.notes.append(note)
        judging = Judging(quality)
        if base is not None:
            settings = calibration or CalibrationSettings()
            settings.check()
            # Load and check the base before any encoding (the first source is read once more for that: small
            # next to calibration, and a bad base stops the batch at once instead of failing every source).
            first = load_source(sources[0], names[0] if names else None, token, format)
            model = Base(resolve(base, "base", token=token).path, first.adapter, device=resolve_device(run.device))
            judging = Judging(quality, model, texts, settings)
        single = progress if len(jobs) == 1 else None
        for outcome in executor(jobs, root, bank[0], workers, ray_address, lambda job: encode(job, bank[0], single, judging)):
            if outcome.status == "added" and outcome.name in coll.manifest.adapters:  # two sources of one name in a batch
                problem = f"the collection already has an adapter named {outcome.name!r} (choose another {{setting}})"
                outcome = Outcome(outcome.given, "failed", name=outcome.name, error=SettingError("name", problem, where=outcome.given))
            if outcome.status == "added":
                entry, wrote, before = None, False, None
                try:
                    if outcome.encoded.vectors is not None:
                        before = grow(root, coll, outcome.encoded)
                    entry = write_encoded(root, outcome.encoded, coll.manifest)
                    wrote = True
                    write_manifest(root, coll.manifest)
                except BaseException as e:
                    # Leave the collection exactly as it was: no entry, no folder of ours, the bank it had (a hard
                    # kill leaves the folder, its journal and any grown bank file; the next writer removes them).
                    coll.manifest.adapters.pop(outcome.name, None)
                    if wrote:
                        discard(root / ADAPTERS / outcome.name)
                    if before is not None:
                        ungrow(root, coll, before)
                    settle(root, [outcome.name])
                    if isinstance(e, VBCompressError):
                        error = e
                    elif isinstance(e, (OSError, SafetensorError)):  # a full disk: this adapter's failure, said in one line
                        error = OutputError(root, f"cannot write adapter {outcome.name!r} ({getattr(e, 'strerror', None) or e})")
                    else:
                        raise
                    outcome = Outcome(outcome.given, "failed", name=outcome.name, error=error)
                if entry is not None and outcome.status == "added":
                    settle(root, [outcome.name])
                    report.added.append(entry)
                    if before is not None:  # committed: the bank it replaced goes (a kill first: the next writer's debris)
                        discard(root / before[0])
                        bank[0] = coll.bank.float()
            if outcome.status == "added":
                if failures.pop(outcome.given, None) is not None:
                    write_failures(root, failures)
            elif outcome.status == "skipped":
                report.skipped.append(outcome.given)
            else:
                report.failed.append(Failure(outcome.given, outcome.name, str(outcome.error), outcome))
                attempts = failures.get(outcome.given, {}).get("attempts", 0) + 1
                failures[outcome.given] = {"name": outcome.name, "error": str(outcome.error), "attempts": attempts}
                write_failures(root, failures)
                if not keep_going:
                    raise outcome.error
            if on_outcome:
                on_outcome(outcome, report)
    return report


@dataclass
class RemoveReport:
    """What ``remove`` took out of a collection."""

    collection: str
    removed: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def remove(collection: str | os.PathLike, names: list[str]) -> RemoveReport:
    """Remove adapters from a collection: journalled, the manifest first (atomically), then their folders."""
    root = Path(collection)
    Store(root)
    with locked(root):
        coll = Store(root)
        adapters_folder(root)  # a symbolic link there would lead the deletes elsewhere
        clean_debris(root, coll.manifest)
        for name in names:
            coll.entry(name)
        for name in names:
            journal(root, name)
            del coll.manifest.adapters[name]
        write_manifest(root, coll.manifest)
        for name in names:
            discard(root / ADAPTERS / name)
        settle(root, names)
    return RemoveReport(collection=str(root), removed=list(names))
