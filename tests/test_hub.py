"""`adapt push` against a local stand-in for the Hub that records every request it gets."""

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import adapt
from adapt.errors import UserError
from adapt.export import save_checkpoint
from adapt.hub import files_to_upload, push
from adapt.presets import tiny_model, tiny_tokenizer

TOKEN = "hf_test_secret_token_42"


class FakeHub(ThreadingHTTPServer):
    """Answers the Hub API calls a push makes (create repo, branch, preupload, commit) and records them.

    Serves on 127.0.0.1 only and stops itself after `lifetime` seconds even if a test forgets to.
    """

    def __init__(self, status: int = 200, lifetime: float = 120.0):
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.status = status
        self.requests: list[dict] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.timer = threading.Timer(lifetime, self.shutdown)
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.timer.cancel()
        self.shutdown()
        self.server_close()


class FakeHubHandler(BaseHTTPRequestHandler):
    def _answer(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        hub: FakeHub = self.server
        hub.requests.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        if hub.status != 200:
            reply = {"error": "Invalid credentials"}
        elif self.path == "/api/repos/create":
            name = json.loads(body)
            reply = {"url": f"{hub.url}/{name['organization']}/{name['name']}"}
        elif "/preupload/" in self.path:
            reply = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                               for f in json.loads(body)["files"]]}
        elif "/commit/" in self.path:
            reply = {"commitUrl": f"{hub.url}/me/model/commit/{'1' * 40}", "commitOid": "1" * 40}
        else:  # branch creation, yaml validation
            reply = {}
        data = json.dumps(reply).encode()
        self.send_response(hub.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The tests talk to 127.0.0.1 only; lift an HF_HUB_OFFLINE=1 of the environment for this process."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapt.ensure_mask_token(model, tokenizer, "add")
    adapt.set_attention(model, 1.0)
    return save_checkpoint(model, tokenizer, tmp_path_factory.mktemp("push") / "ckpt", max_shard_size="60KB")


def committed_files(requests) -> dict[str, bytes]:
    """The files carried by the commit requests (ndjson lines of base64 content)."""
    files = {}
    for request in requests:
        if "/commit/" in request["path"]:
            for line in request["body"].decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
    return files


def test_push_creates_the_repo_and_uploads_every_file_in_one_commit(hub, export_dir):
    uploaded = push(export_dir, "me/model", private=True, revision="v1", token=TOKEN, endpoint=hub.url)
    assert uploaded == files_to_upload(export_dir)
    paths = [(r["method"], r["path"].split("?")[0]) for r in hub.requests]
    assert ("POST", "/api/repos/create") in paths and ("POST", "/api/models/me/model/branch/v1") in paths
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    request = json.loads(create["body"])
    assert (request["organization"], request["name"]) == ("me", "model")
    assert request.get("private") is True or request.get("visibility") == "private"  # wire format by version
    assert sum("/commit/v1" in path for _, path in paths) == 1
    files = committed_files(hub.requests)
    assert sorted(files) == uploaded
    assert all(files[name] == (export_dir / name).read_bytes() for name in uploaded)
    assert all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)


def test_dry_run_lists_files_and_sends_nothing(hub, export_dir):
    listed = push(export_dir, "me/model", dry_run=True, token=TOKEN, endpoint=hub.url)
    assert "config.json" in listed and "modeling_adapt_diffusion.py" in listed and "README.md" in listed
    assert hub.requests == []


def test_an_incomplete_folder_is_refused_before_any_request(hub, export_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (partial / name).write_bytes((export_dir / name).read_bytes())
    with pytest.raises(UserError, match="not a complete export.*safetensors weights"):
        push(partial, "me/model", token=TOKEN, endpoint=hub.url)
    with pytest.raises(UserError, match="owner/name"):
        push(export_dir, "model-without-owner", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_offline_mode_is_named(export_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        push(export_dir, "me/model", token=TOKEN, endpoint="http://127.0.0.1:9")


def test_a_refused_push_is_one_clear_error_without_the_token(export_dir):
    server = FakeHub(status=401)
    try:
        with pytest.raises(UserError, match="HTTP 401") as caught:
            push(export_dir, "me/model", token=TOKEN, endpoint=server.url)
    finally:
        server.stop()
    assert TOKEN not in str(caught.value)


def run_cli(args, endpoint):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "adapt", "push", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_push_takes_the_token_from_the_environment_and_never_prints_it(hub, export_dir):
    dry = run_cli([str(export_dir), "me/model", "--dry-run"], hub.url)
    assert dry.returncode == 0 and hub.requests == []
    assert "would upload" in dry.stdout and "model.safetensors.index.json" in dry.stdout

    result = run_cli([str(export_dir), "me/model", "--revision", "dev"], hub.url)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"uploaded {len(files_to_upload(export_dir))} files to me/model (branch dev)" in result.stdout
    assert hub.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
    for output in (dry.stdout, dry.stderr, result.stdout, result.stderr):
        assert TOKEN not in output

    bad = run_cli([str(export_dir / "missing"), "me/model"], hub.url)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and TOKEN not in bad.stderr
