"""`ser prepare --out s3://...` against a real S3-compatible server on 127.0.0.1 (moto's server mode), used as a
cloud user uses S3: boto3 and pyarrow find it through ``AWS_ENDPOINT_URL``, with dummy keys.

Object stores have no rename, so a dataset there becomes readable only once complete: its parts go straight to
their keys, ``_common_metadata`` (the manifest ``check_dataset``, every reader's gate, requires) is written last,
and an in-progress object names the writer meanwhile. Checked here: the dataset written there reads back equal to
the same corpus prepared locally; a writer killed after its first part leaves nothing readable, and the next run
stops naming it unless --overwrite; a writer stopped by SIGTERM removes what it wrote; foreign objects are never
replaced; --overwrite replaces a dataset `ser prepare` wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ser_platform.data.atomic_folder import IN_PROGRESS
from ser_platform.data.errors import DataError
from ser_platform.data.parquet import check_dataset, prepare_dataset, read_summary
from support import MotoS3

BUCKET = "ser-data"
# A writer that pauses after its first part file, so a test can stop it mid-dataset.
SLOW_WRITER = """
import sys, time
import ser_platform.data.parquet as parquet
flush = parquet._PartWriter.flush
def paused(self):
    flush(self)
    if self.parts == 1:
        print("first part written", flush=True)
        time.sleep(120)
parquet._PartWriter.flush = paused
parquet.prepare_dataset(sys.argv[1], sys.argv[2])
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, its bucket, and this process's environment pointing at it (restored after)."""
    with MotoS3(tmp_path_factory.mktemp("moto")) as server, pytest.MonkeyPatch.context() as patch:
        for key, value in server.env.items():
            patch.setenv(key, value)
        server.create_bucket(BUCKET)
        yield server


def ser(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ser_platform.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_prepare_writes_a_dataset_to_s3_that_reads_back_like_the_local_one(s3, synthetic_corpus, tmp_path):
    run = ser("prepare", "--source", str(synthetic_corpus), "--out", f"s3://{BUCKET}/iemocap.parquet", "--json",
              env=s3.env)
    assert run.returncode == 0, run.stderr[-2000:]
    remote = f"s3://{BUCKET}/iemocap.parquet"
    summary = check_dataset(remote)
    local = prepare_dataset(synthetic_corpus, tmp_path / "local.parquet")
    assert {k: v for k, v in summary.items() if k != "dataset"} == {k: v for k, v in local.items() if k != "dataset"}
    keys = s3.objects(BUCKET, "iemocap.parquet/")
    assert IN_PROGRESS not in "".join(keys) and "iemocap.parquet/_common_metadata" in keys
    filesystem, path = pafs.FileSystem.from_uri(remote)
    table = pq.read_table(path, filesystem=filesystem)
    assert table.num_rows == summary["utterances"] == pq.read_table(tmp_path / "local.parquet").num_rows


def slow_writer(corpus: Path, out: str, env: dict) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(corpus), out], env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while writer.stdout.readline().strip() != "first part written":
        if writer.poll() is not None or time.monotonic() > deadline:
            writer.kill()
            raise RuntimeError(f"the writer did not reach its first part: {writer.stdout.read()[-2000:]}")
    return writer


def test_a_writer_killed_mid_dataset_leaves_nothing_readable_and_is_named(s3, synthetic_corpus):
    out = f"s3://{BUCKET}/killed.parquet"
    writer = slow_writer(synthetic_corpus, out, s3.env)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    keys = s3.objects(BUCKET, "killed.parquet/")
    assert "killed.parquet/part-00000.parquet" in keys and "killed.parquet/_common_metadata" not in keys
    with pytest.raises(DataError, match="not a complete dataset"):
        check_dataset(out)
    again = ser("prepare", "--source", str(synthetic_corpus), "--out", out, env=s3.env)
    assert again.returncode == 2
    assert "an unfinished dataset is here" in again.stderr and f"pid {writer.pid}" in again.stderr
    replaced = ser("prepare", "--source", str(synthetic_corpus), "--out", out, "--overwrite", env=s3.env)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert check_dataset(out)["utterances"] == 120


def test_a_writer_stopped_by_sigterm_removes_what_it_wrote(s3, synthetic_corpus):
    writer = slow_writer(synthetic_corpus, f"s3://{BUCKET}/stopped.parquet", s3.env)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(timeout=60) == 128 + signal.SIGTERM
    assert s3.objects(BUCKET, "stopped.parquet/") == {}


def test_foreign_objects_are_never_replaced_and_a_dataset_only_with_overwrite(s3, synthetic_corpus):
    s3.client().put_object(Bucket=BUCKET, Key="theirs/notes.txt", Body=b"not ours")
    refused = ser("prepare", "--source", str(synthetic_corpus), "--out", f"s3://{BUCKET}/theirs", "--overwrite",
                  env=s3.env)
    assert refused.returncode == 2 and "not a dataset written by `ser prepare`" in refused.stderr
    assert s3.objects(BUCKET, "theirs/") == {"theirs/notes.txt": 8}
    out = f"s3://{BUCKET}/twice.parquet"
    prepare_dataset(synthetic_corpus, out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_dataset(synthetic_corpus, out)
    first = read_summary(out)
    assert prepare_dataset(synthetic_corpus, out, overwrite=True, rows_per_part=16)["parts"] > first["parts"]
    assert check_dataset(out)["utterances"] == first["utterances"]
