"""Tests for tools/local_aws.py, all over real HTTP against moto's server.

They double as a record of how moto 5.2.1 behaves where the backup and
restore code depends on it (IAM actions, Deep Archive restores, SES).
"""

import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import local_aws  # noqa: E402
from aws_setup import bucket_policy  # noqa: E402
from local_aws import (  # noqa: E402
    FaultProxy, LocalAws, backup_policy, classify, restore_policy)

BUCKET = "backup-bucket"
SENDER = "backup@example.com"
MIB = 1024 * 1024
FIVE_MIB_PARTS = TransferConfig(multipart_threshold=5 * MIB,
                                multipart_chunksize=5 * MIB)
NO_RETRIES = Config(retries={"total_max_attempts": 1, "mode": "standard"})


# This module's own server: its tests reset it and switch IAM enforcement on, which
# the session's server (the `aws` fixture) must not see.
@pytest.fixture(scope="module")
def server():
    with LocalAws() as local:
        yield local


@pytest.fixture
def fresh_aws(server):
    """This module's server, reset: one bucket, one verified sender."""
    server.reset()
    server.create_bucket(BUCKET)
    server.verify_ses_identity(SENDER)
    return server


@pytest.fixture
def fresh_proxy(fresh_aws):
    with FaultProxy(fresh_aws.endpoint_url) as fault_proxy:
        yield fault_proxy


def error_code(excinfo):
    return excinfo.value.response["Error"]["Code"]


def http_status(excinfo):
    return excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]


def send_text_email(ses, subject="Backup OK", text="all good"):
    ses.send_email(Source=SENDER,
                   Destination={"ToAddresses": ["admin@example.com"]},
                   Message={"Subject": {"Data": subject},
                            "Body": {"Text": {"Data": text}}})


# ---------------------------------------------------------------- server

def test_server_runs_as_child_process_and_stops():
    local = LocalAws()
    with local:
        process = local._process
        assert process.pid != os.getpid()
        assert local.endpoint_url.startswith("http://127.0.0.1:")
        assert local.region == "us-east-1"
        assert local.client("s3").list_buckets()["Buckets"] == []
    assert process.poll() is not None
    assert not LocalAws._answers(local.port)


def test_a_server_is_never_taken_for_another_sessions_on_the_same_port():
    """Two test sessions given one free port: the second server cannot bind it, and
    must not take the first one's answers for its own (it would lose it when the first
    session ends)."""
    with LocalAws() as first:
        with pytest.raises(RuntimeError, match="did not start"):
            LocalAws(port=first.port).start()
        assert first.client("s3").list_buckets()["Buckets"] == []


def test_clients_ignore_the_users_aws_configuration(fresh_aws, tmp_path,
                                                    monkeypatch):
    config = tmp_path / "config"
    config.write_text("[default]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAREALLOOKING")
    s3 = fresh_aws.client("s3")
    assert s3.meta.region_name == "us-east-1"
    assert s3.meta.endpoint_url == fresh_aws.endpoint_url
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [BUCKET]


def test_env_points_sdks_at_the_server(fresh_aws):
    env = fresh_aws.env()
    assert env["AWS_ENDPOINT_URL"] == fresh_aws.endpoint_url
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_CONFIG_FILE"] == os.devnull


def test_reset_forgets_everything(fresh_aws):
    fresh_aws.client("s3").put_object(Bucket=BUCKET, Key="k", Body=b"x")
    send_text_email(fresh_aws.client("ses"))
    fresh_aws.reset()
    assert fresh_aws.client("s3").list_buckets()["Buckets"] == []
    assert fresh_aws.sent_emails() == []


# ---------------------------------------------------------------- SES

def test_sent_emails_reads_what_ses_accepted(fresh_aws):
    ses = fresh_aws.client("ses")
    send_text_email(ses, "Backup OK", "3 volumes uploaded")
    ses.send_email(
        Source=SENDER,
        Destination={"ToAddresses": ["a@example.com"],
                     "CcAddresses": ["b@example.com"]},
        Message={"Subject": {"Data": "Both bodies"},
                 "Body": {"Text": {"Data": "plain text"},
                          "Html": {"Data": "<p>html</p>"}}})
    mails = fresh_aws.sent_emails()
    assert mails[0] == {
        "source": SENDER, "destinations": ["admin@example.com"],
        "to": ["admin@example.com"], "subject": "Backup OK",
        "body": "3 volumes uploaded", "raw": None}
    # moto keeps only the Html body when both are sent.
    assert mails[1]["body"] == "<p>html</p>"
    assert mails[1]["destinations"] == ["a@example.com", "b@example.com"]


def test_sent_emails_includes_raw_and_sesv2_messages(fresh_aws):
    raw = (f"From: {SENDER}\r\nTo: admin@example.com\r\n"
           "Subject: Raw report\r\nContent-Type: text/plain\r\n\r\nhello\r\n")
    fresh_aws.client("ses").send_raw_email(Source=SENDER,
                                           Destinations=["admin@example.com"],
                                           RawMessage={"Data": raw.encode()})
    fresh_aws.client("sesv2").send_email(
        FromEmailAddress=SENDER,
        Destination={"ToAddresses": ["admin@example.com"]},
        Content={"Simple": {"Subject": {"Data": "v2"},
                            "Body": {"Text": {"Data": "v2 body"}}}})
    simple, raw_mail = fresh_aws.sent_emails()  # SendEmail ones come first
    assert (simple["subject"], simple["body"]) == ("v2", "v2 body")
    assert raw_mail["subject"] == "Raw report"
    assert raw_mail["body"].strip() == "hello"
    assert raw_mail["destinations"] == ["admin@example.com"]
    assert raw_mail["raw"] == raw


def test_unverified_sender_is_rejected(fresh_aws):
    with pytest.raises(ClientError) as excinfo:
        fresh_aws.client("ses").send_email(
            Source="nobody@example.com",
            Destination={"ToAddresses": ["admin@example.com"]},
            Message={"Subject": {"Data": "x"},
                     "Body": {"Text": {"Data": "x"}}})
    assert error_code(excinfo) == "MessageRejected"
    assert fresh_aws.sent_emails() == []


def test_sent_emails_works_while_a_multipart_upload_is_open(fresh_aws):
    # Plain moto 5.2.1 answers data.json with HTTP 500 in this state.
    s3 = fresh_aws.client("s3")
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key="v.7z.001")
    s3.upload_part(Bucket=BUCKET, Key="v.7z.001", PartNumber=1,
                   UploadId=upload["UploadId"], Body=b"x" * 1000)
    send_text_email(fresh_aws.client("ses"), "Backup FAILED")
    assert [m["subject"] for m in fresh_aws.sent_emails()] == ["Backup FAILED"]


# ---------------------------------------------------------------- IAM

@pytest.fixture
def users(fresh_aws):
    """(backup client, restore client, backup ses) with IAM enforced."""
    s3 = fresh_aws.client("s3")
    s3.put_object(Bucket=BUCKET, Key="old.7z.001", Body=b"old",
                  StorageClass="DEEP_ARCHIVE")
    backup = fresh_aws.create_user_with_policy("backup", backup_policy(BUCKET))
    restore = fresh_aws.create_user_with_policy("restore", restore_policy(BUCKET),
                                                managed=True)
    fresh_aws.enable_iam_enforcement()
    return (fresh_aws.client("s3", *backup), fresh_aws.client("s3", *restore),
            fresh_aws.client("ses", *backup))


def test_backup_user_can_upload_list_and_mail(users, fresh_aws, tmp_path):
    backup, _, ses = users
    backup.put_object(Bucket=BUCKET, Key="new.7z.001", Body=b"new",
                      StorageClass="DEEP_ARCHIVE")
    volume = tmp_path / "new.7z.002"
    volume.write_bytes(os.urandom(11 * MIB))
    backup.upload_file(str(volume), BUCKET, "new.7z.002",
                       ExtraArgs={"StorageClass": "DEEP_ARCHIVE"},
                       Config=FIVE_MIB_PARTS)
    listed = backup.list_objects_v2(Bucket=BUCKET)["Contents"]
    keys = {o["Key"] for o in listed}
    assert keys == {"old.7z.001", "new.7z.001", "new.7z.002"}
    assert backup.list_objects(Bucket=BUCKET)["Contents"]  # v1 too
    send_text_email(ses)
    assert fresh_aws.sent_emails()[0]["subject"] == "Backup OK"


@pytest.mark.parametrize("call", [
    lambda s3: s3.get_object(Bucket=BUCKET, Key="old.7z.001"),
    lambda s3: s3.restore_object(Bucket=BUCKET, Key="old.7z.001",
                                 RestoreRequest={"Days": 1}),
    lambda s3: s3.delete_object(Bucket=BUCKET, Key="old.7z.001"),
    lambda s3: s3.list_buckets(),
    lambda s3: s3.get_bucket_location(Bucket=BUCKET),
], ids=["get", "restore", "delete", "list_buckets", "location"])
def test_backup_user_cannot_read_restore_or_delete(users, call):
    backup, _, _ = users
    with pytest.raises(ClientError) as excinfo:
        call(backup)
    assert error_code(excinfo) == "AccessDenied"


def test_backup_user_head_requests_get_bare_403(users):
    backup, _, _ = users
    # HEAD has no body: botocore reports code "403".  moto maps HeadObject
    # to s3:GetObject and HeadBucket to the made-up action s3:HeadBucket.
    for call in (lambda: backup.head_object(Bucket=BUCKET, Key="old.7z.001"),
                 lambda: backup.head_bucket(Bucket=BUCKET)):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert error_code(excinfo) == "403"


def test_backup_user_delete_objects_is_refused_per_key(users, fresh_aws):
    backup, _, _ = users
    answer = backup.delete_objects(
        Bucket=BUCKET, Delete={"Objects": [{"Key": "old.7z.001"}]})
    # No exception: DeleteObjects answers 200 with per-key errors.
    assert answer["Errors"][0]["Code"] == "AccessDenied"
    assert "Deleted" not in answer


def test_backup_user_multipart_needs_put_object_and_abort(fresh_aws):
    write_only = backup_policy(BUCKET, allow_abort=False)
    backup = fresh_aws.client("s3", *fresh_aws.create_user_with_policy("w", write_only))
    fresh_aws.enable_iam_enforcement()
    upload_id = backup.create_multipart_upload(
        Bucket=BUCKET, Key="v", StorageClass="DEEP_ARCHIVE")["UploadId"]
    part = backup.upload_part(Bucket=BUCKET, Key="v", UploadId=upload_id,
                              PartNumber=1, Body=b"last part may be small")
    backup.complete_multipart_upload(
        Bucket=BUCKET, Key="v", UploadId=upload_id,
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    upload_id = backup.create_multipart_upload(Bucket=BUCKET,
                                               Key="w")["UploadId"]
    for call in (
            lambda: backup.abort_multipart_upload(Bucket=BUCKET, Key="w",
                                                  UploadId=upload_id),
            lambda: backup.list_parts(Bucket=BUCKET, Key="w",
                                      UploadId=upload_id),
            lambda: backup.list_multipart_uploads(Bucket=BUCKET)):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert error_code(excinfo) == "AccessDenied"


def test_default_backup_policy_may_abort_multipart_uploads(users):
    backup, _, _ = users
    upload_id = backup.create_multipart_upload(Bucket=BUCKET,
                                               Key="v")["UploadId"]
    backup.abort_multipart_upload(Bucket=BUCKET, Key="v", UploadId=upload_id)


def test_restore_user_can_restore_and_read_but_not_write(users):
    _, restore, _ = users
    assert restore.restore_object(
        Bucket=BUCKET, Key="old.7z.001",
        RestoreRequest={"Days": 1, "GlacierJobParameters": {"Tier": "Bulk"}},
    )["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert "ongoing-request" in restore.head_object(
        Bucket=BUCKET, Key="old.7z.001")["Restore"]
    assert restore.get_object(Bucket=BUCKET,
                              Key="old.7z.001")["Body"].read() == b"old"
    assert restore.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 1
    for call in (lambda: restore.put_object(Bucket=BUCKET, Key="x", Body=b""),
                 lambda: restore.delete_object(Bucket=BUCKET,
                                               Key="old.7z.001")):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert error_code(excinfo) == "AccessDenied"


def test_enforcement_rejects_dummy_keys_and_bad_secrets(users, fresh_aws):
    with pytest.raises(ClientError) as excinfo:
        fresh_aws.client("s3").list_objects_v2(Bucket=BUCKET)
    assert error_code(excinfo) == "InvalidAccessKeyId"
    key_id = users[0]._request_signer._credentials.access_key
    with pytest.raises(ClientError) as excinfo:
        fresh_aws.client("s3", key_id, "wrong").list_objects_v2(Bucket=BUCKET)
    assert error_code(excinfo) == "SignatureDoesNotMatch"


def test_policy_for_another_bucket_grants_nothing(fresh_aws):
    other = fresh_aws.create_user_with_policy("o", backup_policy("other-bucket"))
    fresh_aws.enable_iam_enforcement()
    with pytest.raises(ClientError) as excinfo:
        fresh_aws.client("s3", *other).put_object(Bucket=BUCKET, Key="x", Body=b"")
    assert error_code(excinfo) == "AccessDenied"


# ---------------------------------------------------------------- conditional writes

def complete_one_part(s3, key, **conditions):
    upload_id = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    part = s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id,
                          PartNumber=1, Body=b"part")
    return s3.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=upload_id,
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        **conditions)


def test_if_none_match_refuses_an_existing_name_with_412(fresh_aws):
    s3 = fresh_aws.client("s3")
    s3.put_object(Bucket=BUCKET, Key="k", Body=b"first", IfNoneMatch="*")
    complete_one_part(s3, "m", IfNoneMatch="*")
    for write in (lambda: s3.put_object(Bucket=BUCKET, Key="k", Body=b"2",
                                        IfNoneMatch="*"),
                  lambda: complete_one_part(s3, "m", IfNoneMatch="*")):
        with pytest.raises(ClientError) as excinfo:
            write()
        assert (http_status(excinfo), error_code(excinfo)) == (412, "PreconditionFailed")
    assert s3.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"first"
    assert s3.get_object(Bucket=BUCKET, Key="m")["Body"].read() == b"part"


def test_the_overwrite_denying_bucket_policy_is_enforced(fresh_aws):
    s3 = fresh_aws.client("s3")
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(bucket_policy(BUCKET)))
    s3.put_object(Bucket=BUCKET, Key="new", Body=b"x", IfNoneMatch="*")
    complete_one_part(s3, "new-multipart", IfNoneMatch="*")   # its parts need no header
    for write in (lambda: s3.put_object(Bucket=BUCKET, Key="plain", Body=b"x"),
                  lambda: complete_one_part(s3, "plain-multipart")):
        with pytest.raises(ClientError) as excinfo:
            write()
        assert (http_status(excinfo), error_code(excinfo)) == (403, "AccessDenied")
    s3.delete_object(Bucket=BUCKET, Key="new")                # deleting is not denied
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]) == [
        "new-multipart"]


# ---------------------------------------------------------------- restore

def request_thaw(s3, key, days=2):
    return s3.restore_object(
        Bucket=BUCKET, Key=key,
        RestoreRequest={"Days": days,
                        "GlacierJobParameters": {"Tier": "Bulk"}})


def head_restore(s3, key):
    return s3.head_object(Bucket=BUCKET, Key=key)["Restore"]


def test_deep_archive_restore_progression(fresh_aws):
    s3 = fresh_aws.client("s3")
    s3.put_object(Bucket=BUCKET, Key="v.7z.001", Body=b"secret",
                  StorageClass="DEEP_ARCHIVE")
    head = s3.head_object(Bucket=BUCKET, Key="v.7z.001")
    assert head["StorageClass"] == "DEEP_ARCHIVE" and "Restore" not in head
    listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"][0]
    assert listed["StorageClass"] == "DEEP_ARCHIVE"
    with pytest.raises(ClientError) as excinfo:
        s3.get_object(Bucket=BUCKET, Key="v.7z.001")
    assert (error_code(excinfo), http_status(excinfo)) == (
        "InvalidObjectState", 403)

    fresh_aws.set_restore_progression(3)
    answer = request_thaw(s3, "v.7z.001")
    assert answer["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert head_restore(s3, "v.7z.001") == 'ongoing-request="true"'
    with pytest.raises(ClientError) as excinfo:  # look-up 2 of 3
        s3.get_object(Bucket=BUCKET, Key="v.7z.001")
    assert error_code(excinfo) == "InvalidObjectState"
    with pytest.raises(ClientError) as excinfo:
        request_thaw(s3, "v.7z.001")
    assert (error_code(excinfo), http_status(excinfo)) == (
        "RestoreAlreadyInProgress", 409)
    assert head_restore(s3, "v.7z.001") == 'ongoing-request="true"'

    done = head_restore(s3, "v.7z.001")
    assert done.startswith('ongoing-request="false", expiry-date="')
    assert done.endswith(' GMT"')
    assert s3.get_object(Bucket=BUCKET,
                         Key="v.7z.001")["Body"].read() == b"secret"

    # Restoring a restored object again: 200, and the expiry moves.
    assert request_thaw(s3, "v.7z.001", days=9)[
        "ResponseMetadata"]["HTTPStatusCode"] == 200
    assert head_restore(s3, "v.7z.001") != done


def test_earlier_look_ups_do_not_shorten_a_restore(fresh_aws):
    s3 = fresh_aws.client("s3")
    s3.put_object(Bucket=BUCKET, Key="v", Body=b"x",
                  StorageClass="DEEP_ARCHIVE")
    fresh_aws.set_restore_progression(2)
    for _ in range(5):
        s3.head_object(Bucket=BUCKET, Key="v")
    fresh_aws.sent_emails()  # data.json evaluates every key's state too
    request_thaw(s3, "v")
    states = [s3.head_object(Bucket=BUCKET, Key="v")["Restore"][:21]
              for _ in range(3)]
    assert states == ['ongoing-request="true'] * 2 + ['ongoing-request="fals']


def test_restores_are_immediate_by_default(fresh_aws):
    s3 = fresh_aws.client("s3")
    s3.put_object(Bucket=BUCKET, Key="v", Body=b"x",
                  StorageClass="DEEP_ARCHIVE")
    assert request_thaw(s3, "v")["ResponseMetadata"]["HTTPStatusCode"] == 202
    assert s3.head_object(Bucket=BUCKET, Key="v")["Restore"].startswith(
        'ongoing-request="false"')
    assert s3.get_object(Bucket=BUCKET, Key="v")["Body"].read() == b"x"


def test_restoring_a_standard_or_missing_object_fails(fresh_aws):
    s3 = fresh_aws.client("s3")
    s3.put_object(Bucket=BUCKET, Key="std", Body=b"x")
    with pytest.raises(ClientError) as excinfo:
        request_thaw(s3, "std")
    assert error_code(excinfo) == "InvalidObjectState"
    with pytest.raises(ClientError) as excinfo:
        request_thaw(s3, "missing")
    assert error_code(excinfo) == "NoSuchKey"


# ---------------------------------------------------------------- fresh_proxy

def test_proxy_is_transparent_for_puts_multipart_lists_and_ses(
        fresh_aws, fresh_proxy, tmp_path):
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url)
    s3.put_object(Bucket=BUCKET, Key="small", Body=b"hello")
    data = os.urandom(20 * MIB)
    volume = tmp_path / "big.7z.001"
    volume.write_bytes(data)
    s3.upload_file(str(volume), BUCKET, "big", Config=FIVE_MIB_PARTS,
                   ExtraArgs={"StorageClass": "DEEP_ARCHIVE"})
    listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
    assert {o["Key"]: o["Size"] for o in listed} == {"small": 5,
                                                     "big": 20 * MIB}
    send_text_email(fresh_aws.client("ses", endpoint_url=fresh_proxy.endpoint_url))

    counts = fresh_proxy.counters()
    assert counts["by_kind"] == {
        "PutObject": 1, "CreateMultipartUpload": 1, "UploadPart": 4,
        "CompleteMultipartUpload": 1, "LIST": 1, "ses": 1}
    assert counts["by_method"] == {"PUT": 5, "POST": 3, "GET": 1}
    assert counts["requests"] == 9
    assert counts["bytes_received_by_kind"]["UploadPart"] == 20 * MIB
    assert counts["bytes_received_by_kind"]["PutObject"] == 5
    assert counts["bytes_received"] > 20 * MIB
    assert fresh_aws.sent_emails()[0]["subject"] == "Backup OK"

    fresh_aws.set_restore_immediate()
    request_thaw(fresh_aws.client("s3"), "big")
    fresh_proxy.reset_counters()
    got = s3.get_object(Bucket=BUCKET, Key="big")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert fresh_proxy.counters()["bytes_sent"] == 20 * MIB
    assert fresh_proxy.counters()["by_kind"] == {"GetObject": 1}


def put_at_once(s3, bodies):
    """PutObject each (key, body) at the same time, one connection each."""
    def put(key, body):
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    threads = [threading.Thread(target=put, args=item) for item in bodies.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_limit_upload_holds_the_sum_of_concurrent_uploads(fresh_aws, fresh_proxy):
    rate = 2_000_000
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url,
                          config=Config(max_pool_connections=4))
    bodies = {f"k{n}": os.urandom(MIB + n) for n in range(4)}
    fresh_proxy.limit_upload(rate)
    started = time.monotonic()
    put_at_once(s3, bodies)
    elapsed = time.monotonic() - started
    received = fresh_proxy.counters()["bytes_received"]
    assert received >= sum(map(len, bodies.values()))
    # the four connections together, never one limit each
    assert received <= local_aws.UploadThrottle.BURST + rate * elapsed
    listed = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert listed == {key: len(body) for key, body in bodies.items()}


def test_bytes_received_count_a_body_while_it_arrives(fresh_aws, fresh_proxy):
    """A benchmark can cut a run at N bytes on the wire: the count moves mid-request."""
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url)
    fresh_proxy.limit_upload(1_000_000)
    put = threading.Thread(target=s3.put_object,
                           kwargs={"Bucket": BUCKET, "Key": "slow", "Body": os.urandom(4 * MIB)})
    put.start()
    assert fresh_proxy.wait_for(lambda c: c["bytes_received"] >= MIB, 60)
    # 3 MiB are still to pass the 1 MB/s limit: the PUT has not been forwarded whole
    assert put.is_alive()
    assert "Contents" not in fresh_aws.client("s3").list_objects_v2(Bucket=BUCKET)
    put.join()
    assert fresh_proxy.counters()["bytes_received_by_kind"]["PutObject"] == 4 * MIB


def test_cut_connections_drops_a_body_in_progress(fresh_aws, fresh_proxy):
    """A power cut: what the client had sent beyond the throttle never arrives."""
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url, config=NO_RETRIES)
    fresh_proxy.limit_upload(1_000_000)
    failures = []

    def put():
        try:
            s3.put_object(Bucket=BUCKET, Key="cut", Body=os.urandom(4 * MIB))
        except Exception as problem:        # noqa: BLE001 - the test looks at it
            failures.append(problem)
    thread = threading.Thread(target=put)
    thread.start()
    assert fresh_proxy.wait_for(lambda c: c["bytes_received"] >= MIB, 60)
    fresh_proxy.cut_connections()
    at_cut = fresh_proxy.counters()["bytes_received"]
    thread.join()
    assert failures, "the PUT went through"
    assert fresh_proxy.wait_for(lambda c: c["open_connections"] == 0, 60)
    # nothing more is counted: not even what the socket had buffered (at most the one
    # chunk being counted as the line was cut)
    assert fresh_proxy.counters()["bytes_received"] - at_cut <= local_aws.COPY_CHUNK
    assert "Contents" not in fresh_aws.client("s3").list_objects_v2(Bucket=BUCKET)
    fresh_proxy.limit_upload(None)
    s3.put_object(Bucket=BUCKET, Key="after", Body=b"the line is back")   # new connections
    assert fresh_aws.client("s3").head_object(Bucket=BUCKET, Key="after")["ContentLength"] == 16


def test_signatures_made_for_the_proxy_still_verify(fresh_aws, fresh_proxy):
    backup = fresh_aws.create_user_with_policy("backup", backup_policy(BUCKET))
    fresh_aws.enable_iam_enforcement()
    s3 = fresh_aws.client("s3", *backup, endpoint_url=fresh_proxy.endpoint_url)
    s3.put_object(Bucket=BUCKET, Key="signed", Body=b"x" * (2 * MIB))
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 1
    bad = fresh_aws.client("s3", backup[0], "wrong", endpoint_url=fresh_proxy.endpoint_url)
    with pytest.raises(ClientError) as excinfo:
        bad.put_object(Bucket=BUCKET, Key="x", Body=b"x")
    assert error_code(excinfo) == "SignatureDoesNotMatch"


def raw_put(port, path, headers, body_parts):
    """Send a hand-framed PUT; moto checks no signature unless enforced."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("PUT", path, skip_accept_encoding=True)
    headers = dict(headers, Authorization=(
        "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/"
        "aws4_request, SignedHeaders=host, Signature=0"))
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    for part in body_parts:
        conn.send(part)
    status = conn.getresponse().status
    conn.close()
    return status


def test_proxy_forwards_http_chunked_bodies(fresh_aws, fresh_proxy):
    parts = [b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"]
    assert raw_put(fresh_proxy.port, f"/{BUCKET}/chunked",
                   {"Transfer-Encoding": "chunked",
                    "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}, parts) == 200
    body = fresh_aws.client("s3").get_object(Bucket=BUCKET, Key="chunked")["Body"]
    assert body.read() == b"hello world"
    assert fresh_proxy.counters()["bytes_received"] == sum(map(len, parts))


def test_proxy_forwards_aws_chunked_bodies(fresh_aws, fresh_proxy):
    data = os.urandom(300_000)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))
    body = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % (
        len(data), data, crc)
    assert raw_put(fresh_proxy.port, f"/{BUCKET}/aws-chunked", {
        "Content-Length": str(len(body)),
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "x-amz-trailer": "x-amz-checksum-crc32"}, [body]) == 200
    stored = fresh_aws.client("s3").get_object(Bucket=BUCKET, Key="aws-chunked")
    assert stored["Body"].read() == data
    assert fresh_proxy.counters()["bytes_received"] == len(body)


def test_fail_after_breaks_an_upload_midway(fresh_aws, fresh_proxy, tmp_path):
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url, config=NO_RETRIES)
    volume = tmp_path / "v.7z.001"
    volume.write_bytes(os.urandom(20 * MIB))
    fresh_proxy.fail_after(3)  # create + 2 parts pass, the rest get HTTP 500
    with pytest.raises(Exception, match="InternalError|500"):
        s3.upload_file(str(volume), BUCKET, "v.7z.001",
                       Config=TransferConfig(multipart_threshold=5 * MIB,
                                             multipart_chunksize=5 * MIB,
                                             max_concurrency=1))
    counts = fresh_proxy.counters()
    assert counts["injected_failures"] >= 1
    assert counts["by_kind"]["UploadPart"] >= 3
    direct = fresh_aws.client("s3")
    assert "Contents" not in direct.list_objects_v2(Bucket=BUCKET)
    # s3transfer's abort went through the broken fresh_proxy too, so it is left.
    assert len(direct.list_multipart_uploads(Bucket=BUCKET)["Uploads"]) == 1

    with pytest.raises(ClientError) as excinfo:
        s3.head_bucket(Bucket=BUCKET)
    assert http_status(excinfo) == 500
    with pytest.raises(ClientError) as excinfo:
        s3.list_objects_v2(Bucket=BUCKET)
    assert error_code(excinfo) == "InternalError"
    fresh_proxy.clear_faults()
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0


def test_fail_after_other_status(fresh_aws, fresh_proxy):
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url, config=NO_RETRIES)
    fresh_proxy.fail_after(0, status=503)
    with pytest.raises(ClientError) as excinfo:
        s3.put_object(Bucket=BUCKET, Key="x", Body=b"x" * MIB)
    assert (error_code(excinfo), http_status(excinfo)) == (
        "ServiceUnavailable", 503)
    assert fresh_proxy.counters()["bytes_received"] == MIB


def test_stop_responding_and_resume(fresh_aws, fresh_proxy):
    quick = Config(connect_timeout=1, read_timeout=0.5,
                   retries={"total_max_attempts": 1, "mode": "standard"})
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url, config=quick)
    fresh_proxy.stop_responding()
    started = time.monotonic()
    with pytest.raises(ReadTimeoutError):
        s3.list_objects_v2(Bucket=BUCKET)
    assert time.monotonic() - started < 5
    fresh_proxy.resume()
    assert s3.list_objects_v2(Bucket=BUCKET)["KeyCount"] == 0
    assert fresh_proxy.counters()["stalled"] == 1


def test_held_requests_are_answered_once_released(fresh_aws, fresh_proxy):
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url)
    s3.put_object(Bucket=BUCKET, Key="k", Body=b"x")
    fresh_proxy.hold_requests({"LIST"})
    answers = []
    lister = threading.Thread(target=lambda: answers.append(
        s3.list_objects_v2(Bucket=BUCKET)["KeyCount"]))
    lister.start()
    assert fresh_proxy.wait_for(lambda c: c["held"] == 1, 60)
    assert s3.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"x"   # not held
    assert answers == []
    fresh_proxy.release_requests()
    lister.join(60)
    assert answers == [1]
    assert fresh_proxy.counters()["held"] == 1


def test_faults_can_spare_ses(fresh_aws, fresh_proxy):
    # One local endpoint serves S3 and SES; in AWS they fail separately.
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url, config=NO_RETRIES)
    ses = fresh_aws.client("ses", endpoint_url=fresh_proxy.endpoint_url,
                           config=NO_RETRIES)
    fresh_proxy.fail_after(0, services={"s3"})
    with pytest.raises(ClientError):
        s3.list_objects_v2(Bucket=BUCKET)
    send_text_email(ses, "S3 broken")
    fresh_proxy.clear_faults()
    fresh_proxy.stop_responding(services="s3")
    send_text_email(ses, "S3 gone")
    fresh_proxy.resume()
    assert [m["subject"] for m in fresh_aws.sent_emails()] == ["S3 broken", "S3 gone"]
    assert fresh_proxy.counters()["stalled"] == 0


def test_reset_counters(fresh_aws, fresh_proxy):
    s3 = fresh_aws.client("s3", endpoint_url=fresh_proxy.endpoint_url)
    s3.list_objects_v2(Bucket=BUCKET)
    fresh_proxy.reset_counters()
    counters = fresh_proxy.counters()
    assert counters.pop("open_connections") == 1        # the client keeps its connection
    assert counters == {
        "requests": 0, "by_method": {}, "by_kind": {}, "bytes_received": 0,
        "bytes_sent": 0, "bytes_received_by_kind": {},
        "injected_failures": 0, "stalled": 0, "held": 0}


@pytest.mark.parametrize("method, path, headers, kind", [
    ("PUT", "/b/k", {}, "PutObject"),
    ("PUT", "/b/k?partNumber=2&uploadId=u", {}, "UploadPart"),
    ("PUT", "/b/k", {"x-amz-copy-source": "/b/j"}, "CopyObject"),
    ("PUT", "/b", {}, "CreateBucket"),
    ("POST", "/b/k?uploads", {}, "CreateMultipartUpload"),
    ("POST", "/b/k?uploadId=u", {}, "CompleteMultipartUpload"),
    ("POST", "/b/k?restore", {}, "RestoreObject"),
    ("POST", "/b?delete", {}, "DeleteObjects"),
    ("DELETE", "/b/k?uploadId=u", {}, "AbortMultipartUpload"),
    ("DELETE", "/b/k", {}, "DeleteObject"),
    ("GET", "/b?list-type=2&prefix=x", {}, "LIST"),
    ("GET", "/b/", {}, "LIST"),
    ("GET", "/b?delimiter=%2F&max-keys=1000&marker=a", {}, "LIST"),
    ("GET", "/b?location", {}, "GET bucket?location"),
    ("GET", "/b?uploads", {}, "ListMultipartUploads"),
    ("GET", "/b/dir/k", {}, "GetObject"),
    ("GET", "/b/k?uploadId=u", {}, "ListParts"),
    ("HEAD", "/b/k", {}, "HeadObject"),
    ("HEAD", "/b", {}, "HeadBucket"),
    ("GET", "/", {}, "ListBuckets"),
    ("POST", "/", {"Authorization": "AWS4-HMAC-SHA256 Credential=K/20260101/"
                   "us-east-1/ses/aws4_request, SignedHeaders=host"}, "ses"),
])
def test_classify(method, path, headers, kind):
    assert classify(method, path, headers) == kind


# ---------------------------------------------------------------- CLI

@contextlib.contextmanager
def serving(*options):
    """`local_aws.py serve` with these options; its first line (the endpoint); Ctrl-C at
    the end must stop it cleanly."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "local_aws.py"), "serve", "--port", "0",
         *options],
        stdout=subprocess.PIPE, text=True)
    try:
        yield process.stdout.readline().strip()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        process.stdout.close()


def test_cli_serve_prints_endpoint_and_stops_on_ctrl_c():
    with serving("--bucket", BUCKET, "--sender", SENDER) as line:
        assert line.startswith("AWS_ENDPOINT_URL=http://127.0.0.1:")
        endpoint = line.partition("=")[2]
        s3 = local_aws.isolated_client("s3", endpoint)
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == [BUCKET]
        ses = local_aws.isolated_client("ses", endpoint)
        assert ses.list_identities()["Identities"] == [SENDER]


def test_cli_serve_with_an_upload_limit_serves_through_a_throttled_proxy():
    with serving("--bucket", BUCKET, "--upload-limit", "8Mbit") as line:
        s3 = local_aws.isolated_client("s3", line.partition("=")[2])
        started = time.monotonic()
        s3.put_object(Bucket=BUCKET, Key="k", Body=os.urandom(2 * MIB))
        # 8 Mbit/s: 1,000,000 bytes per second
        assert 2 * MIB <= local_aws.UploadThrottle.BURST + 1e6 * (time.monotonic() - started)
        assert s3.head_object(Bucket=BUCKET, Key="k")["ContentLength"] == 2 * MIB


def test_cli_serve_refuses_a_wrong_upload_limit():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "local_aws.py"), "serve",
         "--upload-limit", "20Mb"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "'20Mb' is not a rate" in result.stderr


def read_variables(text):
    return dict(line.split("=", 1) for line in text.splitlines()
                if "=" in line and not line.startswith("#"))


def test_cli_serve_with_iam_passes_aws_setup_check_runs_a_backup_and_shows_its_email(
        tmp_path):
    """The local quick start: serve --iam, aws_setup.py --check with no PROBLEM, a named
    backup in the endpoint's region with the keys file, then the e-mail it caught."""
    tool = os.path.join(REPO, "tools", "local_aws.py")
    keys_file = tmp_path / "keys.env"
    process = subprocess.Popen(
        [sys.executable, tool, "serve", "--port", "0", "--region", "eu-west-1", "--iam",
         "--bucket", BUCKET, "--sender", SENDER, "--recipient", "me@example.com",
         "--keys-file", str(keys_file)], stdout=subprocess.PIPE, text=True)
    try:
        printed = ""
        while "# E-mails caught" not in printed:
            line = process.stdout.readline()
            assert line, printed
            printed += line
        served = read_variables(printed)
        assert served["AWS_REGION"] == "eu-west-1"
        endpoint = served["AWS_ENDPOINT_URL"]
        keys = read_variables(keys_file.read_text())
        assert keys["AWS_REGION"] == "eu-west-1"
        assert os.stat(keys_file).st_mode & 0o777 == 0o600
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AAM_"))}

        check = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "aws_setup.py"), "--check",
             "--region", "eu-west-1", "--bucket", BUCKET, "--sender", SENDER,
             "--recipient", "me@example.com", "--keys-file", str(keys_file)],
            env=dict(clean, **served), capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "PROBLEM" not in check.stdout and "Check passed" in check.stdout

        source = tmp_path / "source"
        source.mkdir()
        (source / "a.txt").write_bytes(b"a\n")
        (tmp_path / "instructions.txt").write_text(f"{source}/\n")
        (tmp_path / "backup.settings").write_text("\n".join([
            f"log-dir = {tmp_path / 'logs'}", f"instruction-file = {tmp_path}/instructions.txt",
            "destinations = AWS", f"bucket = {BUCKET}", "location = pc",
            "key = env:AAM_ENCRYPTION_KEY", "access-key-id = env:AAM_BACKUP_ACCESS_KEY_ID",
            "secret-access-key = env:AAM_BACKUP_SECRET_ACCESS_KEY",
            f"sender-address = {SENDER}", "recipient = me@example.com"]) + "\n")
        env = dict(clean, **keys, AWS_ENDPOINT_URL=endpoint,
                   AAM_ENCRYPTION_KEY="a key of twenty or more characters",
                   AAM_TEMP_ROOT=str(tmp_path / "temp"),
                   AAM_LOCK_FILE=str(tmp_path / "aam.lock"),
                   AAM_STATE_DIR=str(tmp_path / "state"))
        backup = subprocess.run(
            [sys.executable, os.path.join(REPO, "aam_auto_backup.py"), "regular-backup",
             "--settings", str(tmp_path / "backup.settings")],
            env=env, capture_output=True, text=True, timeout=300)
        assert backup.returncode == 0, backup.stdout + backup.stderr
        assert "E-mail report sent to me@example.com" in backup.stdout

        emails = subprocess.run([sys.executable, tool, "emails", "--endpoint", endpoint],
                                capture_output=True, text=True, timeout=60)
        assert emails.returncode == 0, emails.stderr
        assert emails.stdout.startswith("--- e-mail 1 of 1\nFrom: AAM Auto Backup <"
                                        f"{SENDER}>\nTo: me@example.com\nSubject: SUCCESS, ")
        assert "full backup!" in emails.stdout
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        process.stdout.close()


def test_cli_emails_says_when_no_endpoint_answers():
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "local_aws.py"),
                             "emails", "--endpoint", f"http://127.0.0.1:{local_aws.free_port()}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "error: no local endpoint answers at http://127.0.0.1:" in result.stderr
