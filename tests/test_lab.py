"""`make lab` starts a JupyterLab server that serves the course notebooks."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


pytestmark = pytest.mark.slow  # starts JupyterLab


@pytest.fixture(scope="module")
def lab_server():
    port, token = free_port(), secrets.token_hex(16)
    args = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"
    process = subprocess.Popen(
        ["make", "--no-print-directory", "lab", f"LAB_ARGS={args}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so the whole make -> jupyter tree can be stopped
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            try:
                get(f"{base}/api/status?token={token}")
                break
            except OSError:
                assert process.poll() is None, "make lab exited before the server started"
                time.sleep(1)
        else:
            pytest.fail(f"JupyterLab did not answer within {STARTUP_SECONDS} s")
        yield base, token
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_make_lab_serves_the_notebooks(lab_server):
    base, token = lab_server
    status, page = get(f"{base}/lab?token={token}")
    assert status == 200 and b"JupyterLab" in page
    status, body = get(f"{base}/api/contents/notebooks?token={token}")
    names = {item["name"] for item in json.loads(body)["content"]}
    assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} <= names


def test_the_api_needs_the_token(lab_server):
    base, _ = lab_server
    with pytest.raises(urllib.error.HTTPError) as error:
        get(f"{base}/api/contents")
    assert error.value.code == 403
