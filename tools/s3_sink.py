"""A minimal S3 endpoint for the benchmark that throws Deep Archive data away.

The moto server costs about 7 ms of CPU per MB it receives, on the same cores
as the backup being measured: on a two-core machine that is enough to move a
full backup's wall time by 10-15%.  This endpoint does only what a backup
needs, at a small fraction of that cost, so that a ratio measured against it
is the backup's own:

    PUT bucket, ListObjectsV2 (one page), PutObject, CreateMultipartUpload,
    UploadPart, CompleteMultipartUpload, AbortMultipartUpload, and GetObject/
    HeadObject of objects that are not in DEEP_ARCHIVE.

Bodies of DEEP_ARCHIVE objects (the volumes) are read into one reused buffer
and only their size is kept; other objects (indicators, manifests) are kept
whole.  A restore cannot run against it: reading a Deep Archive object is
refused as S3 refuses it before a thaw (InvalidObjectState), and RestoreObject
is not implemented.  No authentication: it accepts any signature.

    with S3Sink() as sink:
        sink.endpoint_url           # http://127.0.0.1:PORT
        sink.create_bucket("b")
        sink.counters()             # requests, by_kind (LIST, ...), bytes_received
"""

import datetime as dt
import hashlib
import http.server
import re
import threading
import uuid
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

BUFFER = 1024 * 1024
DEEP_ARCHIVE = "DEEP_ARCHIVE"
XML_NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


class StoredObject:
    def __init__(self, size, storage_class, body=None):
        self.size, self.storage_class, self.body = size, storage_class, body
        self.modified = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.etag = hashlib.md5(body or str(size).encode(), usedforsecurity=False).hexdigest()


class S3Sink:
    def __init__(self):
        self.buckets = {}           # name -> {key: StoredObject}
        self.uploads = {}           # upload id -> (bucket, key, storage class, {part: size})
        self.lock = threading.Lock()
        self.requests, self.by_kind, self.bytes_received = 0, {}, 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()

    @property
    def endpoint_url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def create_bucket(self, name):
        self.buckets.setdefault(name, {})

    def counters(self):
        """The subset of FaultProxy.counters() the benchmark reads."""
        with self.lock:
            return {"requests": self.requests, "by_kind": dict(self.by_kind),
                    "bytes_received": self.bytes_received}

    def count(self, kind, received):
        with self.lock:
            self.requests += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            self.bytes_received += received

    def handler_class(self):
        sink = self

        class Handler(SinkHandler):
            pass
        Handler.sink = sink
        return Handler


class SinkHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sink = None

    def log_message(self, *_args):
        pass                # quiet: the benchmark prints its own lines

    # -- request parts
    def target(self):
        parts = urlsplit(self.path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        return bucket, key, {k: v[0] for k, v in parse_qs(parts.query,
                                                          keep_blank_values=True).items()}

    def read_body(self, keep):
        """The request body: bytes if keep, else its size (read into one buffer)."""
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            return self.read_chunked(keep)
        remaining = int(self.headers.get("Content-Length") or 0)
        return self.read_exactly(remaining, keep)

    def read_exactly(self, remaining, keep):
        if keep:
            return self.rfile.read(remaining)
        buffer, size = memoryview(bytearray(BUFFER)), remaining
        while remaining:
            got = self.rfile.readinto(buffer[:min(remaining, BUFFER)])
            if not got:
                raise ConnectionError("the client closed the connection mid-body")
            remaining -= got
        return size

    def read_chunked(self, keep):
        pieces, size = [], 0
        while True:
            length = int(self.rfile.readline().split(b";")[0], 16)
            if length == 0:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass    # trailers
                return b"".join(pieces) if keep else size
            piece = self.read_exactly(length, keep)
            if keep:
                pieces.append(piece)
            size += length
            self.rfile.readline()

    # -- responses
    def reply(self, status, body=b"", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def reply_xml(self, text):
        self.reply(200, f'<?xml version="1.0" encoding="UTF-8"?>\n{text}'.encode(),
                   [("Content-Type", "application/xml")])

    def error(self, status, code, message):
        self.reply(status, f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
                           "</Error>".encode(), [("Content-Type", "application/xml")])

    def objects_of(self, bucket):
        objects = self.sink.buckets.get(bucket)
        if objects is None:
            self.error(404, "NoSuchBucket", bucket)
        return objects

    # -- operations
    def do_PUT(self):
        bucket, key, query = self.target()
        if not key:
            self.sink.count("CREATE_BUCKET", 0)
            self.sink.create_bucket(bucket)
            return self.reply(200)
        objects = self.objects_of(bucket)
        if objects is None:
            return None
        if "uploadId" in query:
            return self.upload_part(query)
        storage_class = self.headers.get("x-amz-storage-class", "STANDARD")
        body = self.read_body(keep=storage_class != DEEP_ARCHIVE)
        size = body if isinstance(body, int) else len(body)
        self.sink.count("PUT", size)
        stored = StoredObject(size, storage_class, None if isinstance(body, int) else body)
        objects[key] = stored
        return self.reply(200, headers=[("ETag", f'"{stored.etag}"')])

    def upload_part(self, query):
        size = self.read_body(keep=False)
        self.sink.count("UPLOAD_PART", size)
        upload = self.sink.uploads.get(query["uploadId"])
        if upload is None:
            return self.error(404, "NoSuchUpload", query["uploadId"])
        upload[3][int(query["partNumber"])] = size
        return self.reply(200, headers=[("ETag", f'"{uuid.uuid4().hex}"')])

    def do_POST(self):
        bucket, key, query = self.target()
        objects = self.objects_of(bucket)
        if objects is None:
            return None
        body = self.read_body(keep=True)
        self.sink.count("POST", len(body))
        if "uploads" in query:
            upload_id = uuid.uuid4().hex
            self.sink.uploads[upload_id] = (bucket, key, self.headers.get(
                "x-amz-storage-class", "STANDARD"), {})
            return self.reply_xml(
                f"<InitiateMultipartUploadResult {XML_NS}><Bucket>{escape(bucket)}</Bucket>"
                f"<Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId>"
                "</InitiateMultipartUploadResult>")
        if "uploadId" in query:
            return self.complete_upload(objects, key, query["uploadId"], body)
        return self.error(501, "NotImplemented", "this sink cannot restore objects")

    def complete_upload(self, objects, key, upload_id, body):
        upload = self.sink.uploads.pop(upload_id, None)
        if upload is None:
            return self.error(404, "NoSuchUpload", upload_id)
        named = [int(n) for n in re.findall(rb"<PartNumber>(\d+)</PartNumber>", body)]
        if sorted(named) != sorted(upload[3]):
            return self.error(400, "InvalidPart", f"parts {named}, uploaded {sorted(upload[3])}")
        stored = StoredObject(sum(upload[3].values()), upload[2])
        objects[key] = stored
        return self.reply_xml(
            f"<CompleteMultipartUploadResult {XML_NS}><Key>{escape(key)}</Key>"
            f"<ETag>\"{stored.etag}-{len(named)}\"</ETag></CompleteMultipartUploadResult>")

    def do_DELETE(self):
        _bucket, _key, query = self.target()
        self.sink.count("DELETE", 0)
        self.sink.uploads.pop(query.get("uploadId"), None)
        return self.reply(204)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        bucket, key, query = self.target()
        objects = self.objects_of(bucket)
        if objects is None:
            return None
        if not key:
            self.sink.count("LIST", 0)
            return self.list_objects(objects, query.get("prefix", ""))
        self.sink.count("GET", 0)
        stored = objects.get(key)
        if stored is None:
            return self.error(404, "NoSuchKey", key)
        if stored.body is None:
            return self.error(403, "InvalidObjectState",
                              "the object is in DEEP_ARCHIVE; this sink keeps no data")
        return self.reply(200, stored.body, [("ETag", f'"{stored.etag}"'),
                                             ("Last-Modified", self.date_time_string())])

    def list_objects(self, objects, prefix):
        contents = "".join(
            f"<Contents><Key>{escape(key)}</Key><LastModified>{stored.modified}</LastModified>"
            f"<ETag>\"{stored.etag}\"</ETag><Size>{stored.size}</Size>"
            f"<StorageClass>{stored.storage_class}</StorageClass></Contents>"
            for key, stored in sorted(objects.items()) if key.startswith(prefix))
        count = contents.count("<Contents>")
        return self.reply_xml(
            f"<ListBucketResult {XML_NS}><Name></Name><Prefix>{escape(prefix)}</Prefix>"
            f"<KeyCount>{count}</KeyCount><MaxKeys>{max(count, 1000)}</MaxKeys>"
            f"<IsTruncated>false</IsTruncated>{contents}</ListBucketResult>")
