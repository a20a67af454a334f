"""Hugging Face Hub access: resolve ``owner/name[/path][@revision]`` to files in the local cache, and push.

Everything goes through huggingface_hub (its cache, ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``); this
module only chooses which files to fetch and turns the Hub's exceptions into one-line :class:`HubError`\\ s.
A local path always wins over a Hub id spelled the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import HubError, listed

# owner/name, then an optional path inside the repo, then an optional @revision (branch, tag or commit).
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?P<path>(?:/[\w.-]+)*)(?:@(?P<rev>[\w./-]+))?$")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CARD = "README.md"
# What a base model needs for merging and calibration: config, tokenizer, safetensors weights and index.
BASE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    path: str = ""  # folder or file inside the repo, "" for its root
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.path}" if self.path else "") + (f"@{self.revision}" if self.revision else "")


def parse_ref(text: str) -> HubRef | None:
    """``owner/name[/path][@revision]`` as a :class:`HubRef`, or None if ``text`` cannot be a Hub id."""
    m = HUB_REF.match(str(text))
    if m is None or ".." in m["repo"] or any(part in (".", "..") for part in m["path"].split("/")[1:]):
        return None
    return HubRef(m["repo"], m["path"].lstrip("/"), m["rev"])


def is_hub_ref(source: str | Path) -> bool:
    """True if ``source`` is not an existing local path but reads as a Hub id. A path that looks local (it
    starts with ``.``, ``/`` or ``~``, or its first folder exists here) is never tried on the Hub: a typo
    there is "no such file", not a network error."""
    if not isinstance(source, str) or Path(source).exists() or parse_ref(source) is None:
        return False
    first = source.split("/", 1)[0]
    return not (source.startswith((".", "/", "~")) or Path(first).is_dir())


@dataclass(frozen=True)
class HubSource:
    """Where a Hub download came from: the id as given, the repo, the revision asked for and the commit got."""

    ref: str
    repo: str
    revision: str
    commit: str


@dataclass(frozen=True)
class Resolved:
    """A command's input as a local path, with its Hub provenance when it came from the Hub."""

    path: Path
    hub: HubSource | None = None


def resolve(source: str | Path, kind: str = "adapter", token: str | None = None) -> Resolved:
    """A local path for ``source``: itself if it exists, else the cached download of a Hub id.

    Commands call this once, at their edge; everything below them takes local paths. ``kind`` picks the
    files fetched: ``"adapter"`` (adapter weights, config and model card) or ``"base"`` (config, tokenizer
    and safetensors weights of a model). A path that neither exists nor reads as a Hub id is returned as
    is, for the reader to report as missing.
    """
    if not is_hub_ref(source):
        return Resolved(Path(source))
    got = download(parse_ref(str(source)), kind, token=token)
    return Resolved(got.path, HubSource(ref=str(source), repo=got.ref.repo_id, revision=got.ref.revision or "main", commit=got.commit))


@dataclass(frozen=True)
class Download:
    ref: HubRef
    path: Path  # the adapter file or folder, or the model folder, in the snapshot
    commit: str  # the commit the snapshot was taken at


def download(ref: HubRef | str, kind: str = "adapter", token: str | None = None) -> Download:
    """Fetch only what ``kind`` needs from the Hub (or the cache when offline) and return where it lies."""
    from huggingface_hub import snapshot_download

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref is None:
        raise HubError(None, "not a Hub id (expected owner/name[/path][@revision])")
    with hub_errors(ref):
        listing, partial = list_files(ref, token)
        try:
            files, target = select_files(ref, listing, kind)
        except HubError as e:
            if not partial:
                raise
            raise HubError(
                ref, f"the local cache holds only {listed(listing)}, not a whole {kind} ({e.problem}); download it once online"
            ) from None
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=files, token=token))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise HubError(ref, f"the local cache lacks {listed(missing)} (download it once online)")
    return Download(ref=ref, path=folder / target, commit=folder.name)


def list_files(ref: HubRef, token: str | None) -> tuple[list[str], bool]:
    """The repo's file paths at the revision, from the Hub or, when it cannot be reached, from the cache;
    and whether the list may be partial (only the files a file-by-file download left in the snapshot)."""
    import httpx2
    from huggingface_hub import HfApi, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, OfflineModeIsEnabled

    try:
        info = HfApi(token=token).model_info(ref.repo_id, revision=ref.revision)
        return [s.rfilename for s in info.siblings or []], False
    except (OfflineModeIsEnabled, httpx2.ConnectError, httpx2.TimeoutException) as error:
        offline = error
    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, revision=ref.revision)], False
    except CachedRepoTreeNotFoundError:
        # PEFT and transformers fetch file by file (hf_hub_download), which stores the files but no tree
        # listing: the cached snapshot's own files are then what there is to read.
        snapshot = cached_snapshot(ref)
        if snapshot is not None:
            return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()), True
        if isinstance(offline, OfflineModeIsEnabled):
            raise HubError(ref, "not in the local cache and HF_HUB_OFFLINE is set (download it once online)") from None
        raise HubError(
            ref, f"no such file or directory here; cannot reach the Hub ({offline.__class__.__name__}) and it is not in the local cache"
        ) from None


def cached_snapshot(ref: HubRef) -> Path | None:
    """The cached snapshot folder of ``ref``'s revision (a branch or tag via its ref file, or a commit), if any."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + ref.repo_id.replace("/", "--"))
    revision = ref.revision or "main"
    ref_file = repo / "refs" / revision
    commit = ref_file.read_text().strip() if ref_file.is_file() else revision
    folder = repo / "snapshots" / commit
    return folder if re.fullmatch(r"[0-9a-f]{40}", commit) and folder.is_dir() else None


def select_files(ref: HubRef, files: list[str], kind: str) -> tuple[list[str], str]:
    """Which of the repo's ``files`` to fetch for ``kind`` (mirroring how local folders are read), and the
    path inside the repo that the command should then read."""
    prefix = ref.path + "/" if ref.path else ""
    if ref.path and ref.path in files:  # a single file named in the id
        return [ref.path], ref.path
    here = sorted(f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :])
    if not here:
        raise HubError(ref, f"no folder {ref.path!r} in the repository" if ref.path else "the repository is empty")
    card = [CARD] if CARD in here else []
    target = ref.path
    if kind == "base":
        chosen = [f for f in here if f.endswith(BASE_SUFFIXES)]
        if not any(f.endswith(".safetensors") for f in chosen):
            raise HubError(ref, f"no .safetensors weights in the repository (it holds: {listed(here)})")
    else:
        weights = [f for f in ADAPTER_WEIGHTS if f in here]
        loose = [f for f in here if f.endswith(".safetensors")]
        if weights and "adapter_config.json" in here:
            chosen = ["adapter_config.json", weights[0]] + [f for f in ("vbcompress.json",) if f in here] + card
        elif len(loose) == 1 or "pytorch_lora_weights.safetensors" in loose:
            chosen = [loose[0] if len(loose) == 1 else "pytorch_lora_weights.safetensors"] + card
            target = prefix + chosen[0]
        else:
            found = f"{len(loose)} .safetensors files; name one as {ref.repo_id}/FILE" if loose else f"it holds: {listed(here)}"
            raise HubError(ref, f"no adapter files in the repository ({found})")
    return [prefix + f for f in chosen], target


class hub_errors:
    """Turn huggingface_hub's exceptions into one-line :class:`HubError` naming ``where``."""

    def __init__(self, where, action: str = "read"):
        self.where, self.action = where, action

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, HubError):
            return False
        import httpx2
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self.where
        if isinstance(error, GatedRepoError):
            problem = "gated repository: accept its conditions on the Hub, then pass {setting} or set HF_TOKEN"
        elif isinstance(error, RepositoryNotFoundError):
            problem = "no such file or directory here, and no such repository on the Hub (a private one needs {setting} or HF_TOKEN)"
        elif isinstance(error, RevisionNotFoundError):
            problem = f"revision {getattr(where, 'revision', None)!r} not found in the repository"
        elif isinstance(error, HfHubHTTPError) and error.response is not None and error.response.status_code in (401, 403):
            problem = f"not authorised to {self.action} (HTTP {error.response.status_code}): pass {{setting}} or set HF_TOKEN with {self.action} access"
        elif isinstance(error, OfflineModeIsEnabled) or (isinstance(error, LocalEntryNotFoundError) and is_offline()):
            problem = "not in the local cache and HF_HUB_OFFLINE is set (download it once online)"
        elif isinstance(error, (LocalEntryNotFoundError, httpx2.TransportError)):
            problem = f"no such file or directory here; cannot reach the Hub and the files are not in the local cache ({error.__class__.__name__})"
        elif isinstance(error, HfHubHTTPError):
            status = error.response.status_code if error.response is not None else "?"
            problem = f"the Hub answered HTTP {status}: {str(error).splitlines()[0]}"
        else:
            return False
        raise HubError(where, problem, setting="token" if "{setting}" in problem else None) from error


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def create_repo(repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` unless it exists (which also proves write access); returns its URL."""
    from huggingface_hub import HfApi

    target = parse_ref(repo_id)
    if target is None or target.path or target.revision:
        raise HubError(repo_id, "the push target must be a repository id owner/name", setting="push_to")
    with hub_errors(repo_id, action="write"):
        # private=None keeps the owner's default visibility; an existing repo keeps its own.
        return str(HfApi(token=token).create_repo(repo_id, private=private or None, exist_ok=True))


@dataclass(frozen=True)
class Pushed:
    """Where ``push`` put a folder: the repo, its URL, and the commit made."""

    repo: str
    url: str
    commit_url: str
    commit: str


def push(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, url: str | None = None) -> Pushed:
    """Upload ``folder`` to ``repo_id`` as one commit, creating the repo unless its ``url`` is given
    (already created)."""
    from huggingface_hub import HfApi

    url = url or create_repo(repo_id, private=private, token=token)
    with hub_errors(repo_id, action="write"):
        commit = HfApi(token=token).upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message="Upload VB-LoRA adapter made with vbcompress"
        )
    return Pushed(repo=repo_id, url=url, commit_url=commit.commit_url, commit=commit.oid)
