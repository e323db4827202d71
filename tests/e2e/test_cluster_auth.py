"""Ray token authentication as cluster/*.yaml sets it up, on a local head.

The head runs like the cluster's: `RAY_AUTH_MODE=token` and the token in a file named by RAY_AUTH_TOKEN_PATH
(the YAMLs sync ~/.ray/auth_token to every node). Clients get the token through the environment. Found with
Ray 2.60: the job API answers 401 without a token and 403 with a wrong one; the `ray job` CLI needs
RAY_AUTH_MODE=token *and* the token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), the token alone
is refused.

The head gets its own ports, temp dir and HOME (so no other Ray instance on this machine and no
~/.ray/auth_token is touched) and runs under `ray start --block`, whose SIGTERM handler stops every process it
started; the fixture's finalizer does that even when a test fails, then kills anything left that carries the
head's temp dir. Linux (/proc).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import RAY_CLI, clean_env, head_command, processes_mentioning


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def token_head():
    # Its own head, not the integration tier's ray_cluster: token auth is set when the head starts.
    # Short temp dir: Ray's socket paths under it must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ser-auth-", dir="/tmp"))
    home = root / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    command, dashboard = head_command(root / "ray", num_cpus=1)
    env = clean_env(home, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file),
                    # no drain wait on SIGTERM: this head serves nobody else
                    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    log = open(root / "head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, _ = get(url + "/api/jobs/")
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray head did not start:\n{(root / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "token": token, "home": home, "status_at_start": status}
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
        for pid in processes_mentioning(str(root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def ray_job_submit(token_head: dict, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        RAY_CLI + ["job", "submit", f"--address={token_head['url']}", "--", "python", "-c", "print(42)"],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_job_api_without_token_is_401(token_head):
    assert token_head["status_at_start"] == 401
    assert get(token_head["url"] + "/api/jobs/")[0] == 401


def test_job_api_with_a_wrong_token_is_403(token_head):
    assert get(token_head["url"] + "/api/jobs/", token="0" * 64)[0] == 403


def test_job_api_with_the_token_answers(token_head):
    status, body = get(token_head["url"] + "/api/jobs/", token=token_head["token"])
    assert status == 200
    assert isinstance(json.loads(body), list)


def test_job_submit_with_auth_mode_and_token_succeeds(token_head):
    env = clean_env(token_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token_head["token"])
    run = ray_job_submit(token_head, env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "42" in run.stdout.splitlines()
    status, body = get(token_head["url"] + "/api/jobs/", token=token_head["token"])
    jobs = [job for job in json.loads(body) if job["entrypoint"] == "python -c 'print(42)'"]
    assert [job["status"] for job in jobs] == ["SUCCEEDED"]


def test_job_submit_with_the_token_but_not_the_mode_is_refused(token_head):
    env = clean_env(token_head["home"], RAY_AUTH_TOKEN=token_head["token"])
    run = ray_job_submit(token_head, env)
    assert run.returncode != 0
    assert "Unauthorized" in run.stdout + run.stderr


def test_job_submit_with_a_wrong_token_is_refused(token_head):
    env = clean_env(token_head["home"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    run = ray_job_submit(token_head, env)
    assert run.returncode != 0
    assert "Invalid authentication token" in run.stdout + run.stderr
