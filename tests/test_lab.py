"""`make lab` starts JupyterLab for any user (root included) and runs code in the project's kernel."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import websocket

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-" + uuid.uuid4().hex


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def _execute(port: int, kernel_id: str, code: str, timeout: float = 60) -> str:
    """Return what `code` printed, run in the kernel over the server's websocket (Jupyter protocol v5)."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels?token={TOKEN}",
                                     timeout=timeout)
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True},
    }))
    printed, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            message = json.loads(ws.recv())
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                raise AssertionError(f"cell failed: {message['content']['ename']}: {message['content']['evalue']}")
            elif message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
                return "".join(printed)
    finally:
        ws.close()
    raise AssertionError(f"no reply from the kernel within {timeout} s")


@pytest.mark.integration
def test_make_lab_serves_the_lab_page_and_runs_a_cell_in_the_project_kernel(tmp_path):
    port = _free_port()
    args = f"--no-browser --port={port} --ServerApp.ip=127.0.0.1 --IdentityProvider.token={TOKEN}"
    log = (tmp_path / "lab.log").open("w")
    lab = subprocess.Popen(["make", "--no-print-directory", "lab", f"LAB_ARGS={args}"], cwd=REPO, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert lab.poll() is None, f"make lab exited with {lab.returncode}:\n{(tmp_path / 'lab.log').read_text()}"
            try:
                status, page = _get(f"http://127.0.0.1:{port}/lab?token={TOKEN}")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not answer within 120 s"
                time.sleep(1)
        assert status == 200 and "JupyterLab" in page
        specs = json.loads(_get(f"http://127.0.0.1:{port}/api/kernelspecs?token={TOKEN}")[1])
        assert "fedhf" in specs["kernelspecs"], f"the project kernel is not installed: {list(specs['kernelspecs'])}"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/kernels?token={TOKEN}", method="POST",
                                         data=json.dumps({"name": "fedhf"}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            kernel = json.loads(response.read())
        printed = _execute(port, kernel["id"], "import compendium.paths, fl.models\n"
                                                "print(compendium.paths.REPO_ROOT.name, fl.models.__name__)")
        assert printed.split() == [REPO.name, "fl.models"]
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
        log.close()
