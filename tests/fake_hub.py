"""A small stand-in for the Hugging Face Hub, for huggingface_hub's real download code.

It serves the routes that huggingface_hub's ``snapshot_download`` and our
downloader call, on a free loopback port (point ``HF_ENDPOINT`` at
``FakeHub.endpoint``):

    GET  /api/models/{repo}/revision/{rev}        model_info: the commit sha
    GET  /api/models/{repo}/tree/{rev}[/{path}]   list_repo_tree: sizes, git oid, LFS sha256
    HEAD /{repo}/resolve/{rev}/{file}             metadata: X-Repo-Commit, ETag, X-Linked-Etag/-Size
    GET  /{repo}/resolve/{rev}/{file}             the bytes, with Range for resumed downloads

Errors carry the headers huggingface_hub maps to its exceptions
(``X-Error-Code: RepoNotFound / RevisionNotFound / GatedRepo``, and
``X-Error-Message: Invalid credentials in Authorization header`` for a bad
token). Xet is not advertised, so the client downloads over plain HTTP.

Faults, per file: ``cut_once(name, after)`` drops the connection after AFTER
bytes once (the client resumes with Range in the same run); ``stall(name,
after)`` sends AFTER bytes then hangs until released (the test interrupts the
client meanwhile); ``fail(name, after)`` drops the first response after AFTER
bytes and every later request for that file at once (a network that stays
down). Every request is recorded for the assertions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    lfs_suffixes: tuple[str, ...] = (".safetensors",)
    gated: bool = False
    granted_tokens: frozenset[str] = frozenset()
    branches: tuple[str, ...] = ("main",)
    commit: str = field(default="")

    def __post_init__(self) -> None:
        if not self.commit:
            digest = hashlib.sha1(usedforsecurity=False)
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.commit = digest.hexdigest()

    def is_lfs(self, name: str) -> bool:
        return name.endswith(self.lfs_suffixes)

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(name) else git_blob_sha1(data)

    def tree(self) -> list[dict]:
        entries: list[dict] = []
        folders: set[str] = set()
        for name in sorted(self.files):
            parts = name.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": folder})
            data = self.files[name]
            entry: dict = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
            if self.is_lfs(name):
                # An LFS file: "oid" is the git id of its pointer; "size" and "lfs" describe the content.
                pointer = (
                    "version https://git-lfs.github.com/spec/v1\n"
                    f"oid sha256:{self.etag(name)}\nsize {len(data)}\n"
                )
                entry["oid"] = git_blob_sha1(pointer.encode())
                entry["size"] = len(data)
                entry["lfs"] = {"oid": self.etag(name), "size": len(data), "pointerSize": len(pointer)}
            entries.append(entry)
        return entries


@dataclass
class _Fault:
    kind: str  # "cut_once" | "stall" | "fail"
    after: int
    fired: bool = False


class FakeHub:
    """The fake Hub server; use as a context manager (stops and releases stalled requests)."""

    def __init__(self, *repos: FakeRepo, valid_tokens: tuple[str, ...] = ()) -> None:
        self.repos = {r.repo_id: r for r in repos}
        # Tokens the "Hub" knows; any other bearer token is rejected as invalid.
        self.valid_tokens = set(valid_tokens)
        for r in repos:
            self.valid_tokens |= set(r.granted_tokens)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.faults: dict[str, _Fault] = {}
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.completed: Counter[str] = Counter()  # file name -> bodies sent in full
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- faults ---------------------------------------------------------------
    def cut_once(self, name: str, after: int) -> None:
        self.faults[name] = _Fault("cut_once", after)

    def stall(self, name: str, after: int) -> None:
        self.faults[name] = _Fault("stall", after)

    def fail(self, name: str, after: int) -> None:
        self.faults[name] = _Fault("fail", after)

    # -- bookkeeping ------------------------------------------------------------
    def count(self, method: str, name: str) -> int:
        """Requests METHOD made for file NAME on the resolve route."""
        suffix = "/" + name
        with self.lock:
            return sum(
                1 for m, p, _ in self.requests if m == method and "/resolve/" in p and p.endswith(suffix)
            )

    def resolve_gets(self) -> list[tuple[str, dict[str, str]]]:
        with self.lock:
            return [(p, h) for m, p, h in self.requests if m == "GET" and "/resolve/" in p]

    def authorization_headers(self) -> set[str]:
        with self.lock:
            return {h.get("authorization", "") for _, _, h in self.requests}

    # -- lifecycle --------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.0"  # one request per connection: a cut is a closed socket

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    # -- helpers ---------------------------------------------------------------
    def _record(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.fake.lock:
            self.fake.requests.append((self.command, urlsplit(self.path).path, headers))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None = None, message: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message or code or "error"}).encode(), headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _repo_and_commit(self, repo_id: str, rev: str) -> tuple[FakeRepo, str] | None:
        token = self._token()
        if token is not None and token not in self.fake.valid_tokens:
            self._error(401, message="Invalid credentials in Authorization header")
            return None
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            # Like the Hub: 401 without a token (it could be private), 404 with one.
            self._error(404 if token else 401, "RepoNotFound", "Repository not found")
            return None
        rev = unquote(rev)
        if rev not in repo.branches and rev != repo.commit:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, repo.commit

    # -- routes ------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        self._record()
        url = urlsplit(self.path)
        path = url.path
        if m := _API.match(path):
            found = self._repo_and_commit(m["repo"], m["rev"])
            if found is None:
                return
            repo, commit = found
            if m["kind"] == "revision":
                body = {
                    "id": repo.repo_id,
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "siblings": [{"rfilename": n} for n in sorted(repo.files)],
                }
            else:
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                prefix = (m["path"] or "").strip("/")
                body = [
                    e
                    for e in repo.tree()
                    if (not prefix or e["path"].startswith(prefix + "/"))
                    and (recursive or "/" not in e["path"][len(prefix) + 1 if prefix else 0 :])
                ]
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
            return
        if m := _RESOLVE.match(path):
            found = self._repo_and_commit(m["repo"], m["rev"])
            if found is None:
                return
            repo, commit = found
            name = unquote(m["file"])
            if repo.gated:
                token = self._token()
                if token is None:
                    self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
                    return
                if token not in repo.granted_tokens:
                    self._error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
                    return
            if name not in repo.files:
                self._error(404, "EntryNotFound", f"{name} does not exist")
                return
            self._file(repo, commit, name)
            return
        self._error(404, message=f"no route {path}")

    def _file(self, repo: FakeRepo, commit: str, name: str) -> None:
        data = repo.files[name]
        etag = repo.etag(name)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{git_blob_sha1(data) if repo.is_lfs(name) else etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if repo.is_lfs(name):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        if self.command == "HEAD":
            self._send(200, data, headers)  # Content-Length of the body, no body
            return
        start = 0
        if rng := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(rng[1])
            if start >= len(data):
                self._error(416, message="Range not satisfiable")
                return
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        fault = self.fake.faults.get(name)
        if fault is not None and fault.kind == "fail" and fault.fired:
            self._drop()  # the network stays down for this file
            return
        self.send_response(206 if start else 200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault is not None and not fault.fired and fault.after < len(body):
            fault.fired = True
            self.wfile.write(body[: fault.after])
            self.wfile.flush()
            if fault.kind == "stall":
                self.fake.stalled.set()
                self.fake.release.wait(timeout=60)
            self._drop()
            return
        self.wfile.write(body)
        self.wfile.flush()
        with self.fake.lock:
            self.fake.completed[name] += 1

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


def small_model_repo(
    repo_id: str = "test-org/tiny-vl",
    shard_sizes: tuple[int, ...] = (1_200_000, 1_500_000, 900_000),
    **kwargs: object,
) -> FakeRepo:
    """A repo shaped like the real one: config, index, shards, tokenizer files, one file in a folder."""
    files: dict[str, bytes] = {}
    weight_map = {}
    n = len(shard_sizes)
    for i, size in enumerate(shard_sizes, start=1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        # Deterministic, incompressible-looking bytes.
        seed = hashlib.sha256(name.encode()).digest()
        blocks = (size + 31) // 32
        files[name] = b"".join(
            hashlib.sha256(seed + j.to_bytes(4, "little")).digest() for j in range(blocks)
        )[:size]
        weight_map[f"layer.{i}.weight"] = name
    files["config.json"] = json.dumps({"architectures": ["Qwen3VLMoeForConditionalGeneration"]}).encode()
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": sum(shard_sizes)}, "weight_map": weight_map}
    ).encode()
    files["tokenizer.json"] = json.dumps({"model": {"vocab": {f"t{i}": i for i in range(2000)}}}).encode()
    files["tokenizer_config.json"] = b'{"model_max_length": 262144}'
    files["extra/notes.txt"] = b"a file in a folder\n"
    return FakeRepo(repo_id, files, **kwargs)  # type: ignore[arg-type]
