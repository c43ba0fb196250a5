"""A loopback HTTP server speaking the part of the Hugging Face Hub API that an upload uses.

It lets tests run the REAL huggingface_hub client (in a ``compress push`` subprocess with
``HF_ENDPOINT`` pointing here) and check what arrived. Endpoints, as huggingface_hub 2.4 calls
them for ``create_repo`` + ``create_branch`` + ``create_commit``:

* ``POST /api/repos/create`` — JSON ``{name, organization, visibility|private, type}``
* ``POST /api/models/{repo}/branch/{branch}``
* ``GET /api/models/{repo}`` — ``model_info`` (visibility of an existing repository)
* ``POST /api/validate-yaml`` — the README metadata check ``create_commit`` makes first
* ``POST /api/models/{repo}/preupload/{rev}`` — which files are LFS (``*.safetensors``,
  ``*.onnx``, ``*.bin``, over 10 MB: what the Hub's default ``.gitattributes`` says)
* ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /_lfs/{oid}`` + ``POST /_lfs/{oid}/verify``
  — the Git LFS basic transfer (used when ``HF_HUB_DISABLE_XET=1``; the Xet protocol is not
  served here)
* ``POST /api/models/{repo}/commit/{rev}`` — NDJSON: a ``header`` line, then ``file`` (base64)
  and ``lfsFile`` (sha256 oid) lines

huggingface_hub 2.4 also fetches ``GET /api/agent-harnesses`` (a registry for its agent
detection, cached in ``HF_HOME``); it is answered with an empty registry.

Every request is recorded (method, path, query, headers, body); requests to other paths get a
404 and are kept in :attr:`FakeHub.unhandled`.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.onnx", "*.onnx.data", "*.bin", "*.gguf", "*.png")


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    files: dict[str, bytes] = field(default_factory=dict)  # regular files (base64 in the commit)
    lfs_files: dict[str, dict] = field(default_factory=dict)  # path -> {oid, size}


class FakeHub:
    """The server; ``with FakeHub(token) as hub:`` starts it on 127.0.0.1 and stops it.

    Args:
        token: the only token accepted (``Authorization: Bearer <token>``); others get 401.
        writable: namespaces the token may create repositories in (others get 403).
    """

    def __init__(self, token: str, writable: tuple[str, ...] = ("me",)):
        self.token = token
        self.writable = writable
        self.requests: list[dict] = []
        self.unhandled: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.commits: list[Commit] = []
        self.lfs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # silence the default stderr log
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                rec = {
                    "method": self.command,
                    "path": unquote(parts.path),
                    "query": parse_qs(parts.query),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
                with hub._lock:
                    hub.requests.append(rec)
                status, payload, extra = hub._route(rec)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -------------------------------------------------------------------- routing
    def _authorized(self, rec: dict) -> bool:
        return rec["headers"].get("authorization") == f"Bearer {self.token}"

    def _route(self, rec: dict):
        m, path = rec["method"], rec["path"]
        if path.startswith("/_lfs/"):
            return self._lfs_object(rec)
        if m == "GET" and path == "/api/agent-harnesses":  # huggingface_hub's best-effort agent telemetry
            return 200, {"standardEnvVars": [], "harnesses": {}}, None
        if not self._authorized(rec):
            return 401, {"error": "Invalid credentials in Authorization header"}, {"X-Error-Message": "Invalid credentials"}
        if m == "POST" and path == "/api/repos/create":
            return self._create_repo(rec)
        if m == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(rec)
        if m == "GET" and path.startswith("/api/models/") and path.count("/") == 4:  # model_info
            repo_id = path[len("/api/models/"):]
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            return 200, {"id": repo_id, "private": self.repos[repo_id]["private"], "sha": "0" * 40}, None
        if m == "POST" and path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for verb in ("preupload", "commit", "branch"):
                marker = f"/{verb}/"
                if marker in rest:
                    repo_id, arg = rest.split(marker, 1)
                    if repo_id not in self.repos:
                        return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
                    return getattr(self, f"_{verb}")(rec, repo_id, arg)
        if m == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            return self._lfs_batch(rec, path[1 : -len(".git/info/lfs/objects/batch")])
        self.unhandled.append(rec)
        return 404, {"error": f"not served by the fake hub: {m} {path}"}, None

    def _create_repo(self, rec: dict):
        req = json.loads(rec["body"])
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else f"me/{req['name']}"
        if repo_id.split("/")[0] not in self.writable:
            return 403, {"error": f"You don't have the rights to create a model under the namespace \"{repo_id.split('/')[0]}\""}, None
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, None
        private = req.get("private", req.get("visibility") == "private")
        self.repos[repo_id] = {"private": bool(private), "branches": {"main"}, "request": req}
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}, None

    def _validate_yaml(self, rec: dict):
        """The front matter must be a YAML mapping; a model-index must hold numeric metric values."""
        import yaml

        content = json.loads(rec["body"])["content"]
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content.split("\n---", 1)[0][4:]) or {}
            except yaml.YAMLError as exc:
                meta, errors = {}, [f"invalid YAML: {exc}"]
            if not isinstance(meta, dict):
                errors.append("metadata is not a mapping")
            for model in (meta.get("model-index") or []) if isinstance(meta, dict) else []:
                for res in model.get("results", []):
                    for met in res.get("metrics", []):
                        if not isinstance(met.get("value"), (int, float)):
                            errors.append(f"metric {met.get('type')} has a non-numeric value")
        if errors:
            return 400, {"errors": [{"message": e} for e in errors], "warnings": []}, None
        return 200, {"errors": [], "warnings": []}, None

    def _branch(self, rec: dict, repo_id: str, branch: str):
        self.repos[repo_id]["branches"].add(branch)
        return 200, {}, None

    def _preupload(self, rec: dict, repo_id: str, revision: str):
        req = json.loads(rec["body"])
        files = []
        for f in req["files"]:
            lfs = f["size"] > 10_000_000 or any(fnmatch.fnmatch(f["path"], p) for p in LFS_PATTERNS)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": None})
        return 200, {"files": files, "commitOid": "0" * 40}, None

    def _lfs_batch(self, rec: dict, repo_id: str):
        req = json.loads(rec["body"])
        objects = []
        for obj in req["objects"]:
            oid = obj["oid"]
            objects.append({
                "oid": oid,
                "size": obj["size"],
                "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.url}/_lfs/{oid}"},
                    "verify": {"href": f"{self.url}/_lfs/{oid}/verify"},
                },
            })
        return 200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}

    def _lfs_object(self, rec: dict):
        parts = rec["path"].split("/")  # ['', '_lfs', oid] or ['', '_lfs', oid, 'verify']
        oid = parts[2]
        if rec["method"] == "PUT":
            if hashlib.sha256(rec["body"]).hexdigest() != oid:
                return 400, {"error": "sha256 mismatch"}, None
            self.lfs[oid] = rec["body"]
            return 200, {}, {"ETag": '"etag"'}
        if rec["method"] == "POST" and len(parts) > 3 and parts[3] == "verify":
            return (200, {}, None) if oid in self.lfs else (404, {"error": "object not uploaded"}, None)
        self.unhandled.append(rec)
        return 404, {"error": "bad lfs request"}, None

    def _commit(self, rec: dict, repo_id: str, revision: str):
        lines = [json.loads(ln) for ln in rec["body"].splitlines() if ln.strip()]
        header = next(ln["value"] for ln in lines if ln["key"] == "header")
        commit = Commit(repo_id, revision, header.get("summary", ""), header.get("description", ""))
        for ln in lines:
            v = ln["value"]
            if ln["key"] == "file":
                assert v.get("encoding") == "base64", v
                commit.files[v["path"]] = base64.b64decode(v["content"])
            elif ln["key"] == "lfsFile":
                if v["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {v['oid']} was never uploaded"}, None
                commit.lfs_files[v["path"]] = {"oid": v["oid"], "size": v.get("size")}
            elif ln["key"] != "header":
                return 400, {"error": f"unsupported commit line {ln['key']}"}, None
        self.commits.append(commit)
        oid = hashlib.sha1(rec["body"]).hexdigest()
        return 200, {"success": True, "commitOid": oid, "commitUrl": f"{self.url}/{repo_id}/commit/{oid}"}, None

    # -------------------------------------------------------------------- for assertions
    def committed_bytes(self, commit: Commit) -> dict[str, bytes]:
        """Every file of a commit with its content (LFS ones from the uploaded objects)."""
        out = dict(commit.files)
        for path, info in commit.lfs_files.items():
            out[path] = self.lfs[info["oid"]]
        return out
