"""No object is ever replaced: every write carries If-None-Match: *, and a refused
write is a FAILURE naming the object, never retried.

Real parts: the moto server over HTTP (which honours If-None-Match and, through
tools/local_aws.py, the overwrite-denying bucket policy), the CLI as a subprocess,
real 7-Zip.
"""

import io
import json
import os
import uuid

import pytest
from boto3.s3.transfer import TransferConfig

import aam_auto_backup as aam
from aws_setup import bucket_policy
from test_pipelined_upload import ListLedger, ListLog, piece_done, zip_volumes

MIB = 1024 * 1024
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)


def deny_overwrites(s3, bucket):
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(bucket_policy(bucket)))


def body_of(s3, bucket, key):
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_a_backup_writes_every_object_under_the_overwrite_denying_policy(sandbox):
    """The policy denies any write without the header: a run that succeeds sent it."""
    sandbox.sample(picture_size=200_000)
    deny_overwrites(sandbox.s3(), sandbox.bucket)
    result = sandbox.backup(env=sandbox.env(AAM_VOLUME_SIZE="65536"))
    assert result.returncode == 0, result.stdout + result.stderr
    keys = [item["Key"] for item in sandbox.objects()]
    assert sum("_yes_" in k for k in keys) == 2 and sum("_piece" in k for k in keys) > 2


@pytest.mark.parametrize("size, config", [(1000, None), (6 * MIB, SMALL_PARTS)],
                         ids=["PutObject", "multipart"])
def test_a_volume_is_never_written_over(aws, tmp_path, size, config):
    bucket = f"no-overwrite-{uuid.uuid4().hex[:12]}"
    aws.create_bucket(bucket)
    s3 = aws.client("s3")
    deny_overwrites(s3, bucket)
    s3.put_object(Bucket=bucket, Key="vol.001", Body=b"the first backup", IfNoneMatch="*")
    archives = tmp_path / "archives"
    (archives / "1").mkdir(parents=True)
    zip_volumes(archives / "1", {"random.bin": os.urandom(size)}, volume_size=64 * MIB)
    piece_done(archives, 1, volumes=1)
    uploads = aam.RunUploads(aam.new_objects_only(aws.client("s3")), bucket,
                             config or aam.transfer_config())
    uploader = aam.PieceUploader(uploads, str(tmp_path), lambda _piece, n: f"vol.{n:03d}",
                                 ListLog(), ListLedger(), 1, aam.DEFAULT_VOLUME_SIZE)
    with pytest.raises(aam.WriteRefused) as refused:
        uploader.finish()
    assert str(refused.value) == (f"the volume s3://{bucket}/vol.001 already exists; this "
                                  "program never replaces an object, so it was not written "
                                  "(HTTP 412)")
    assert body_of(s3, bucket, "vol.001") == b"the first backup"
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)   # aborted, not kept


def test_an_indicator_is_never_written_over(aws):
    bucket = f"no-overwrite-{uuid.uuid4().hex[:12]}"
    aws.create_bucket(bucket)
    s3 = aws.client("s3")
    key = "pc_20260101_000000.000000_0_0.0_yes_-home-ann"
    uploads = aam.RunUploads(aam.new_objects_only(aws.client("s3")), bucket,
                             aam.transfer_config())
    uploads.upload(io.BytesIO(b"{}"), key, kind="completion indicator")
    with pytest.raises(aam.WriteRefused) as refused:
        uploads.upload(io.BytesIO(b"forged"), key, kind="completion indicator")
    assert f"the completion indicator s3://{bucket}/{key} already exists" in str(refused.value)
    assert body_of(s3, bucket, key) == b"{}"


@pytest.mark.parametrize("kind, marker", [("volume", "_piece0001_"),
                                          ("completion indicator", "_yes_"),
                                          ("catalogue", "_catalogue_"),
                                          ("key check", "_keycheck_")])
def test_a_run_that_meets_an_existing_name_fails_clearly(sandbox, proxy, kind, marker):
    sandbox.sample()
    proxy.plant_first("PutObject", marker, b"was here first")
    result = sandbox.backup(env=sandbox.env(AWS_ENDPOINT_URL=proxy.endpoint_url))
    assert result.returncode == 1, result.stdout + result.stderr
    (planted,) = [o["Key"] for o in sandbox.objects() if marker in o["Key"]
                  and body_of(sandbox.s3(), sandbox.bucket, o["Key"]) == b"was here first"]
    assert (f"the {kind} s3://{sandbox.bucket}/{planted} already exists; this program never "
            "replaces an object, so it was not written (HTTP 412)") in result.stdout
    if kind != "key check":       # written before any volume: nothing of the set was sent
        assert "no completion indicator was written" in result.stdout
    # Each object was asked for once: the refused write was not retried.
    assert proxy.counters()["by_kind"]["PutObject"] == len(sandbox.objects())
    assert sandbox.emails()[-1]["subject"].startswith("FAILURE, ")
