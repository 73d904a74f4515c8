"""A stand-in for the Hugging Face Hub: one model repository served from a local folder, over the part
of the Hub's HTTP API that `huggingface_hub.snapshot_download` uses (the revision's commit, the file
tree, each file by commit), behind a required token, as a gated model is. It counts what each file was
downloaded, so a test can tell one download from several.

    with HubStandIn(folder, "org/model", token) as hub:
        hub.endpoint  # for llm.hub_endpoint
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # one revision, the one `main` names


class HubStandIn:
    def __init__(self, folder: Path, repo: str, token: str) -> None:
        self.folder, self.repo, self.token = folder, repo, token
        self.files = {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}
        self.oids = {name: hashlib.sha1(p.read_bytes()).hexdigest() for name, p in self.files.items()}
        self.downloads: Counter[str] = Counter()  # file name -> GETs of its content
        self.refused = 0  # requests without the token
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandIn:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    hub.refused += 1
                    self._send(401, b'{"error": "Access to this model is restricted"}', {}, body)
                    return
                path = unquote(urlparse(self.path).path)
                api = f"/api/models/{hub.repo}/"
                if path.startswith(api + "revision/"):
                    info = {"id": hub.repo, "modelId": hub.repo, "sha": COMMIT, "private": False,
                            "siblings": [{"rfilename": name} for name in hub.files]}  # fmt: skip
                    self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)
                elif path.startswith(api + "tree/"):
                    tree = [
                        {"type": "file", "path": name, "size": p.stat().st_size, "oid": hub.oids[name]}
                        for name, p in hub.files.items()
                    ]
                    self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body)
                elif path.startswith(f"/{hub.repo}/resolve/"):
                    name = path.rsplit("/", 1)[-1]
                    if name not in hub.files:
                        self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, body)
                        return
                    data = hub.files[name].read_bytes()
                    if body:
                        hub.downloads[name] += 1
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hub.oids[name]}"'}
                    self._send(200, data, headers, body)
                else:
                    self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)

            def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler
