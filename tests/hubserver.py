"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1, for tests that must never leave the machine.

It answers the endpoints huggingface_hub calls to download a snapshot (model info, tree listing, file
resolve) and to publish one (create repo, preupload, commit), and records every request. Point
``HF_ENDPOINT`` at :attr:`FakeHub.url`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Repo:
    """A repository at one commit; file contents are bytes, or a Path read when served."""

    def __init__(self, files: dict[str, bytes | Path], *, private: bool = False, gated: bool = False, branches=("main",)):
        self.files, self.private, self.gated = files, private, gated
        contents = {p: self.read(p) for p in files}  # read once: the tree listing needs size and oid of every file
        self.sizes = {p: len(data) for p, data in contents.items()}
        self.oids = {p: hashlib.sha1(data).hexdigest() for p, data in contents.items()}
        self.sha = hashlib.sha1(json.dumps(sorted(self.oids.items())).encode()).hexdigest()
        self.refs = {b: self.sha for b in branches}

    @classmethod
    def from_folder(cls, folder: Path, **kwargs) -> Repo:
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(files, **kwargs)

    def read(self, path: str) -> bytes:
        data = self.files[path]
        return data.read_bytes() if isinstance(data, Path) else data

    def commit(self, revision: str | None) -> str | None:
        revision = revision or "main"
        return self.sha if revision == self.sha else self.refs.get(revision)


class FakeHub:
    """``repos``: repo id → :class:`Repo`. Requests need ``Authorization: Bearer <token>`` for private and
    gated repos and for writing. Uploads land in :attr:`uploads` (repo id → {path: bytes})."""

    def __init__(self, repos: dict[str, Repo], token: str = "hf_test_token"):
        self.repos, self.token = repos, token
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.uploads: dict[str, dict[str, bytes]] = {}
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):
                hub.handle(self, "HEAD")

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- plumbing --------------------------------------------------------------------------------------
    def send(self, h, status: int, body: bytes | dict | list = b"", headers: dict | None = None, method: str = "GET"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(body)

    def error(self, h, status: int, code: str | None, message: str, method: str):
        headers = {"X-Error-Code": code} if code else {}
        self.send(h, status, {"error": message}, {**headers, "X-Error-Message": message}, method)

    def authorised(self, h) -> bool:
        return h.headers.get("Authorization") == f"Bearer {self.token}"

    def readable(self, h, repo_id: str, method: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.authorised(h)):
            self.error(h, 401 if repo is not None else 404, "RepoNotFound", "Repository not found", method)
            return None
        if repo.gated and not self.authorised(h):
            self.error(h, 403, "GatedRepo", "Access to this repo is restricted", method)
            return None
        return repo

    def handle(self, h, method: str) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.requests.append((method, path))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        parts = path.strip("/").split("/")
        try:
            if method == "POST" and path == "/api/repos/create":
                return self.create(h, json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                return self.validate_yaml(h, json.loads(body)["content"])
            if parts[:2] == ["api", "models"] and len(parts) == 4 and method != "POST":
                return self.info(h, "/".join(parts[2:4]), "main", method)
            if parts[:2] == ["api", "models"] and len(parts) >= 5:
                repo_id, action, rest = "/".join(parts[2:4]), parts[4], parts[5:]
                if action == "revision":
                    return self.info(h, repo_id, "/".join(rest), method)
                if action == "tree":
                    return self.tree(h, repo_id, rest[0] if rest else "main", method)
                if action == "preupload" and method == "POST":
                    return self.preupload(h, repo_id, json.loads(body))
                if action == "commit" and method == "POST":
                    return self.commit(h, repo_id, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self.resolve(h, "/".join(parts[:2]), parts[3], "/".join(parts[4:]), method)
        except Exception as e:  # a bug in the fake must show up in the test, not hang it
            return self.error(h, 500, None, f"fake hub: {e!r}", method)
        self.error(h, 404, None, f"fake hub has no route for {method} {path}", method)

    # -- read ------------------------------------------------------------------------------------------
    def at_revision(self, h, repo_id: str, revision: str, method: str) -> tuple[Repo, str] | None:
        """The readable repo and the commit ``revision`` names, or None once the error is sent."""
        repo = self.readable(h, repo_id, method)
        if repo is None:
            return None
        sha = repo.commit(revision)
        if sha is None:
            self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", method)
            return None
        return repo, sha

    def info(self, h, repo_id: str, revision: str, method: str):
        if (found := self.at_revision(h, repo_id, revision, method)) is None:
            return
        repo, sha = found
        self.send(
            h,
            200,
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": repo.gated,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(repo.files)],
            },
            method=method,
        )

    def tree(self, h, repo_id: str, revision: str, method: str):
        if (found := self.at_revision(h, repo_id, revision, method)) is None:
            return
        repo, _ = found
        entries = [{"type": "file", "path": p, "size": repo.sizes[p], "oid": repo.oids[p]} for p in sorted(repo.files)]
        self.send(h, 200, entries, method=method)

    def resolve(self, h, repo_id: str, revision: str, filename: str, method: str):
        if (found := self.at_revision(h, repo_id, revision, method)) is None:
            return
        repo, sha = found
        if filename not in repo.files:
            return self.error(h, 404, "EntryNotFound", f"{filename} does not exist", method)
        etag = f'"{repo.oids[filename]}"'
        self.send(h, 200, repo.read(filename), {"X-Repo-Commit": sha, "ETag": etag, "Content-Type": "application/octet-stream"}, method)

    # -- write -----------------------------------------------------------------------------------------
    def create(self, h, payload: dict):
        if not self.authorised(h):
            return self.error(h, 401, None, "Invalid credentials in Authorization header", "POST")
        self.created.append(payload)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        self.uploads.setdefault(repo_id, {})
        self.send(h, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, h, content: str):
        """Like the Hub: the model card's front matter must be a YAML mapping with well-typed known keys."""
        import yaml

        errors = []
        if not content.startswith("---\n") or "\n---" not in content[3:]:
            errors.append("README.md has no YAML front matter")
        else:
            try:
                meta = yaml.safe_load(content[4 : content.index("\n---", 3)])
            except yaml.YAMLError as e:
                meta, errors = None, [f"invalid YAML: {e}"]
            if not errors and not isinstance(meta, dict):
                errors.append("front matter is not a mapping")
            elif not errors:
                for key, types in {"base_model": (str, list), "library_name": str, "tags": list, "license": str}.items():
                    if key in meta and not isinstance(meta[key], types):
                        errors.append(f"{key} has the wrong type")
        self.validated.append(content)
        self.send(h, 400 if errors else 200, {"errors": [{"message": m} for m in errors], "warnings": []})

    def preupload(self, h, repo_id: str, payload: dict):
        if not self.authorised(h):
            return self.error(h, 401, None, "Invalid credentials in Authorization header", "POST")
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in payload["files"]]
        self.send(h, 200, {"files": files})

    def commit(self, h, repo_id: str, body: bytes):
        if not self.authorised(h):
            return self.error(h, 401, None, "Invalid credentials in Authorization header", "POST")
        store = self.uploads.setdefault(repo_id, {})
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                store[value["path"]] = (
                    base64.b64decode(value["content"]) if value.get("encoding") == "base64" else value["content"].encode()
                )
        oid = hashlib.sha1(json.dumps(sorted(store)).encode()).hexdigest()
        self.send(h, 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "pullRequestUrl": None})
