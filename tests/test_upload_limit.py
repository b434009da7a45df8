"""AAM_UPLOAD_LIMIT: one rate for every upload of a run, across concurrent parts.

Real parts: the CLI as a subprocess, real 7-Zip, a real moto server over HTTP behind
the counting proxy, which measures what reaches it.  Only upper bounds on the rate
are asserted: a slow machine makes a run slower, never faster.
"""

import io
import os
import threading
import time

import pytest
from boto3.s3.transfer import TransferConfig

import aam_auto_backup as aam
from test_pipelined_upload import backup_env, keys, make_source

MIB = 1024 * 1024
TOLERANCE = 1.10            # the bound: the rate holds within 10%


class FirstByte(threading.Thread):
    """When the proxy saw the first byte of a request body (monotonic time)."""

    def __init__(self, proxy):
        super().__init__(daemon=True)
        self.proxy, self.at = proxy, None
        self.start()

    def run(self):
        if self.proxy.wait_for(lambda c: c["bytes_received"] > 0, 600):
            self.at = time.monotonic()


@pytest.mark.parametrize("text, rate", [
    ("2500000", 2_500_000), ("2.5M", 2_500_000), ("2.5MB/s", 2_500_000),
    ("20Mbit", 2_500_000), ("20 Mbit/s", 2_500_000), ("20Mbps", 2_500_000),
    ("512k", 512_000), ("512KiB", 524_288), ("1Gi", 1024 ** 3), (" 64 kbit ", 8000)])
def test_rates_are_read_in_bytes_per_second(text, rate):
    assert aam.parse_byte_rate(text) == rate


@pytest.mark.parametrize("text, why", [
    ("20Mb", "is not a rate"),              # bits or bytes? Mbit or MB says it
    ("2,5M", "is not a rate"),
    ("fast", "is not a rate"),
    ("20", "is 20 bytes per second; the least is 1000"),
    ("0", "is 0 bytes per second; the least is 1000")])
def test_a_wrong_upload_limit_stops_the_run_before_anything(sandbox, text, why):
    sandbox.sample()
    result = sandbox.backup(env=sandbox.env(AAM_UPLOAD_LIMIT=text))
    assert result.returncode == aam.EXIT_USAGE
    assert f"error: environment variable AAM_UPLOAD_LIMIT: {text!r} {why}" in result.stderr
    assert sandbox.objects() == [] and sandbox.emails() == []
    assert not os.path.exists(sandbox.logs) and not os.path.exists(sandbox.mirror)


def test_the_limit_caps_a_whole_run(sandbox, proxy):
    """Volumes under the multipart threshold (one PutObject each), the catalogue and the
    indicator together stay under the limit."""
    limit = 1_000_000
    make_source(sandbox, files=8, size=1_000_000)
    first = FirstByte(proxy)
    result = sandbox.backup({"destinations": "AWS", "mirror_root": "", "send_email": "False"},
                            env=backup_env(sandbox, proxy, AAM_UPLOAD_LIMIT="8Mbit"))
    ended = time.monotonic()
    assert result.returncode == 0, result.stdout + result.stderr
    counters = proxy.counters()
    assert "UploadPart" not in counters["by_kind"] and counters["by_kind"]["PutObject"] >= 6
    assert counters["bytes_received"] > 8_000_000
    assert counters["bytes_received"] <= TOLERANCE * limit * (ended - first.at)
    assert len(keys(sandbox, "piece")) >= 4
    assert ("Uploads are limited to 1,000,000 bytes per second in all (AAM_UPLOAD_LIMIT)."
            in result.stdout)


def test_concurrent_uploads_of_a_run_share_one_limit(aws, proxy, tmp_path):
    """A multipart upload's parallel parts and another upload at the same time: one
    limit for them all (boto3's upload_file would give each call a limiter of its own)."""
    limit = 3_000_000
    aws.create_bucket("one-limit")
    s3 = aam.new_objects_only(aws.client("s3", endpoint_url=proxy.endpoint_url))
    config = aam.transfer_config(limit)
    small_parts = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB,
                                 max_concurrency=config.max_request_concurrency,
                                 max_bandwidth=config.max_bandwidth)
    uploads = aam.RunUploads(s3, "one-limit", small_parts)
    large = tmp_path / "large"
    large.write_bytes(os.urandom(12 * MIB))
    other = threading.Thread(target=uploads.upload,
                             args=(io.BytesIO(os.urandom(4 * MIB)), "other"))
    started = time.monotonic()
    other.start()
    uploads.upload(str(large), "large")
    other.join()
    elapsed = time.monotonic() - started
    uploads.close()
    counters = proxy.counters()
    assert counters["by_kind"]["UploadPart"] == 3 and counters["by_kind"]["PutObject"] == 1
    assert counters["bytes_received"] >= 16 * MIB
    assert counters["bytes_received"] <= TOLERANCE * limit * elapsed
