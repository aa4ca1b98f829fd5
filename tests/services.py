"""Real servers the tests start on 127.0.0.1, each on a free port, stopped when its `with` block ends:
an S3-compatible object store (moto's standalone `moto_server`, in memory) and an MLflow tracking server
(`mlflow server` over a SQLite file). Both come with the `dev` extra; a server that does not answer within
`timeout` seconds fails the test with its log."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import free_port

BIN = Path(sys.executable).parent  # the venv's console scripts


@contextlib.contextmanager
def server(command: list[str], health: str, log: Path, timeout: float = 90) -> Iterator[None]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not answers(health):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start (exit {process.poll()}): {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def s3_store(tmp: Path) -> Iterator[dict[str, str]]:
    """An empty S3-compatible store; yields the environment a client needs (endpoint and test credentials)."""
    port = free_port()
    with server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                f"http://127.0.0.1:{port}/moto-api/", tmp / "moto.log"):
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def mlflow_server(tmp: Path) -> Iterator[str]:
    """An MLflow tracking server with a SQLite store and local artifacts; yields its URI."""
    port = free_port()
    with server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--default-artifact-root",
                 str(tmp / "artifacts")], f"http://127.0.0.1:{port}/health", tmp / "mlflow.log"):
        yield f"http://127.0.0.1:{port}"
