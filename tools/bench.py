#!/usr/bin/env python3
"""Benchmark AAM Auto Backup against restic, duplicity and plain 7-Zip.

compare (the default mode) generates a reproducible tree (by default 10,000
files, about 0.5 GB: half compressible text, half random bytes, 200 B to
200 KB each), starts a local S3 endpoint and measures, for each tool, four
scenarios on the same tree:

    full         the first (full) backup
    incr-1%      an incremental after 1% of the files were rewritten
    incr-none    an incremental with nothing changed
    restore      restoring the latest state (full + incrementals)

scale runs AAM and plain 7-Zip on trees of small files (default 10,000,
100,000 and 1,000,000 files of ~4 KB; --counts, --mean-size) through full,
incr-none and restore, and prints three Markdown tables: the figures per
file count, AAM's time around its 7-Zip run, and how memory and time grow
per file.  compression measures 7-Zip's levels.

uplink runs AAM and restic on a tree of random files (default 200 files, 200 MB,
16 MiB volumes) behind the proxy's upload throttle (--rate, default 40 Mbit/s),
each scenario in a bucket of its own:

    uplink       a full backup over the throttled link
    cut          the same, cut once 60% of the uncut run's stored bytes are on the
                 wire (SIGKILL of the whole process tree, and the proxy drops its
                 connections: a power cut), then run again to its end
    limit        a full backup under the tool's own upload limit at the same rate
                 (AAM_UPLOAD_LIMIT, restic --limit-upload), the link not throttled

and reports the bytes on the wire against the archive's (for cut: both runs
against the uncut run's), the wall time against the wire time of those bytes
(bytes / rate) and where the rest went, and the rate the own limits achieved.

Each run is one process tree, measured from outside:

    wall         elapsed time
    cpu          user + system time of the whole tree (RUSAGE_CHILDREN delta:
                 every descendant is waited for by its parent)
    peak RSS     the largest sum of the resident set sizes of the tree's
                 processes, sampled every 50 ms from /proc (shared pages count
                 once per process); also split by process: Python (for AAM:
                 ours, parent and child) and 7-Zip, each its own peak
    endpoint CPU the local S3 endpoint's CPU time during the run (it shares the
                 machine's cores with the tool: see --endpoint sink)
    uploaded     request bytes (bodies, as framed on the wire) that reached
                 the S3 endpoint
    requests     S3 requests (LIST requests in brackets)

The tools:

    aam          aam_auto_backup.py regular-backup, destination AWS only,
                 one-step-aws-data-restoration for the restore
    7zip         plain `7zz a -tzip -mem=AES256` with the same switches,
                 level and volume size (the archiver's own speed, our floor;
                 nothing is uploaded); the incremental archives exactly the
                 changed files
    restic       its S3 backend on the same endpoint (s3:http://.../bucket)
    duplicity    its boto3 S3 backend on the same endpoint

The endpoint is moto's server (at the lowest CPU priority) behind the
counting proxy of tools/local_aws.py, or with --endpoint sink the minimal
endpoint of tools/s3_sink.py, which discards the volumes at a thirtieth of
moto's CPU (backups only: it cannot restore).  Secrets reach restic and
duplicity through environment variables and 7-Zip through standard input,
never the command line.  The machine is shared and noisy: quote ratios from
one run, not absolute times; CPU times and RSS are the steadier figures.

    tools/bench.py                              # default tree, all tools
    tools/bench.py --files 100000               # 100,000 files (same 50 KB mean size)
    tools/bench.py --tools aam,7zip --files 50 --total-bytes 1M   # tiny (CI)
    tools/bench.py scale                        # 10k, 100k, 1M small files
    tools/bench.py scale --counts 10k,100k      # without the million
    tools/bench.py scale --endpoint sink        # the same, against the sink
    tools/bench.py compression                  # 7-Zip level against size and time
    tools/bench.py uplink                       # 40 Mbit/s, cut and continued
    tools/bench.py uplink --rate 20Mbit --scenarios uplink,cut

Installing restic and duplicity (Debian): tools/setup.sh --bench.
"""

import argparse
import collections
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PROGRAM = os.path.join(REPO, "aam_auto_backup.py")
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import aam_auto_backup as aam  # noqa: E402
import option_types  # noqa: E402
from local_aws import FaultProxy, LocalAws  # noqa: E402
from s3_sink import S3Sink  # noqa: E402

TOOLS = ("aam", "7zip", "restic", "duplicity")
SCENARIOS = ("full", "incr-1%", "incr-none", "restore")
# The local S3 endpoint stands in for a remote service: on a 2-core machine it must
# not take CPU from the tool being measured, so it runs at the lowest priority.
ENDPOINT_NICENESS = 19
# Over a throttled link the CPU is not what limits a backup, and S3's answer to a PUT does
# not wait for this machine's load; a niced server's does (measured: its answers came up to
# a second late on a busy machine, idling the link between volumes). So the uplink mode
# runs the server at normal priority: ~1.4 s of CPU for 200 MB.
UPLINK_ENDPOINT_NICENESS = 0
MIN_SIZE, MAX_SIZE = 200, 200_000
ARCHIVE_KEY = "bench archive key, not a secret 42!"
ACCESS_KEY_ID, SECRET_KEY = "testing", "testing"
LOCATION = "benchpc"
DEFAULT_VOLUME_SIZE = 64 * 1024 * 1024
SAMPLE_SECONDS = 0.05
# AAM's default -mx level (a later version may move the constant)
DEFAULT_LEVEL = getattr(aam, "DEFAULT_COMPRESSION_LEVEL", 1)


# ---------------------------------------------------------------- the tree

def parse_size(text):
    """'500M', '5G', '1000000' -> bytes (powers of 1000, as disks are sold)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    factor = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match[2].lower()]
    return int(float(match[1]) * factor)


def size_exponent(files, total_bytes):
    """k such that sizes MIN + (MAX-MIN) * u**k (u uniform) average total/files."""
    mean = total_bytes / files
    mean = min(max(mean, MIN_SIZE + 1), (MIN_SIZE + MAX_SIZE) / 2)
    return (MAX_SIZE - MIN_SIZE) / (mean - MIN_SIZE) - 1


def text_corpus(rng, size=16 * 1024 * 1024):
    """Word-like text with a Zipf-ish vocabulary: compresses like prose (~3:1)."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    vocabulary = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(20000)]
    weights = [1.0 / (rank + 1) for rank in range(len(vocabulary))]
    words = rng.choices(vocabulary, weights, k=size // 5)
    for index in range(0, len(words), 12):
        words[index] += "\n" if rng.random() < 0.5 else ","
    return " ".join(words).encode()[:size]


class BenchTree:
    """files: {relative path: kind}; kind is 'text' or 'random'."""

    def __init__(self, root, files, total_bytes, seed):
        self.root = root
        self.count = files
        self.rng = random.Random(seed)
        self.exponent = size_exponent(files, total_bytes)
        self.corpus = text_corpus(random.Random(seed + 1))
        self.files = {}
        self.total_bytes = 0

    def generate(self):
        for index in range(self.count):
            kind = "text" if index % 2 == 0 else "random"
            relative = os.path.join(f"d{index // 100:04d}",
                                    f"f{index:06d}.{'txt' if kind == 'text' else 'bin'}")
            size = int(MIN_SIZE + (MAX_SIZE - MIN_SIZE) * self.rng.random() ** self.exponent)
            self.write(relative, kind, size)
            self.files[relative] = kind
            self.total_bytes += size
        return self

    def content(self, kind, size):
        if kind == "random":
            return self.rng.randbytes(size)
        start = self.rng.randrange(0, len(self.corpus) - size)
        return self.corpus[start:start + size]

    def write(self, relative, kind, size):
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(self.content(kind, size))

    def change(self, fraction):
        """Rewrite a fraction of the files (same kind and size); their paths."""
        chosen = self.rng.sample(sorted(self.files), max(1, int(self.count * fraction)))
        for relative in chosen:
            size = os.path.getsize(os.path.join(self.root, relative))
            self.write(relative, self.files[relative], size)
        return chosen


class SmallFileTree:
    """count small files for the scale mode: sizes uniform in mean/4 .. 7/4 mean,
    half text (compressible), half random bytes, 100 files per directory.

    Contents are slices of two 16 MiB buffers made once, written with os.write:
    the time goes to the file system, not to Python (see docs/performance.md for 1,000,000).
    """

    PER_DIRECTORY = 100

    def __init__(self, root, count, mean_size, seed):
        self.root, self.count, self.mean_size, self.seed = root, count, mean_size, seed
        self.total_bytes = 0

    def generate(self):
        rng = random.Random(self.seed)
        buffers = (memoryview(text_corpus(random.Random(self.seed + 1))),
                   memoryview(rng.randbytes(16 * 1024 * 1024)))
        low, high = max(1, self.mean_size // 4), max(1, self.mean_size * 7 // 4)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        directory = None
        for index in range(self.count):
            if index % self.PER_DIRECTORY == 0:
                directory = os.path.join(self.root, f"d{index // self.PER_DIRECTORY:05d}")
                os.makedirs(directory)
            size = rng.randint(low, high)
            data = buffers[index % 2]
            start = rng.randrange(len(data) - size)
            handle = os.open(f"{directory}/f{index:07d}.{('txt', 'bin')[index % 2]}", flags,
                             0o644)
            try:
                os.write(handle, data[start:start + size])
            finally:
                os.close(handle)
            self.total_bytes += size
        # written back now, so that the first measured run does not pay for it
        os.sync()
        return self

    def change(self, _fraction):
        raise NotImplementedError("the scale mode has no incr-1% scenario")


def compressed_tree(root, files, total_bytes, seed):
    """Mostly already-compressed data, like photos: 90% deflated text, 10% text."""
    rng = random.Random(seed)
    corpus = text_corpus(random.Random(seed + 1))
    exponent = size_exponent(files, total_bytes)
    for index in range(files):
        size = int(MIN_SIZE + (MAX_SIZE - MIN_SIZE) * rng.random() ** exponent)
        start = rng.randrange(0, len(corpus) - 4 * size)
        if index % 10:
            data = zlib.compress(corpus[start:start + 4 * size], 9)[:size]
            name = f"p{index:06d}.jpg"
        else:
            data, name = corpus[start:start + size], f"n{index:06d}.txt"
        path = os.path.join(root, f"d{index // 100:04d}", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)


def tree_summary(root):
    count = size = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            count += 1
            size += os.lstat(os.path.join(directory, name)).st_size
    return count, size


# ---------------------------------------------------------------- measuring

def process_class(command):
    """Which part of a run a process is: '7zip', 'python' (for AAM: ours) or 'other'."""
    if command in ("7zz", "7z", "7za"):
        return "7zip"
    return "python" if command.startswith("python") else "other"


Process = collections.namedtuple("Process", "command state rss cpu children argv")


def read_process(pid, page_size=os.sysconf("SC_PAGE_SIZE"),
                 ticks=os.sysconf("SC_CLK_TCK")):
    """A Process (RSS in bytes, CPU in seconds) from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read()
        children = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", "rb") as handle:
                children += [int(child) for child in handle.read().split()]
    except (OSError, ValueError):
        return None         # the process ended meanwhile
    # the command name (field 2) may hold spaces and ')': the fields follow its last ')'
    close = stat.rindex(b")")
    command = stat[stat.index(b"(") + 1:close].decode(errors="replace")
    fields = stat[close + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks         # utime + stime
    return Process(command, fields[0].decode(), int(fields[21]) * page_size, cpu, children,
                   argv)


def archive_work(argv):
    """Whether a 7-Zip command line archives, tests or extracts (not a version check)."""
    words = argv.split(b"\0")
    return len(words) > 1 and words[1] in (b"a", b"u", b"t", b"x", b"e")


class ProcessSampler(threading.Thread):
    """Samples a process tree from /proc every period seconds until stopped.

    It follows /proc/PID/task/*/children from the root, so only the tree is
    read.  It keeps the peak RSS of the whole tree and of each process class
    (the sum over that class's processes at one instant: shared pages count
    once per process), each process's last CPU time (a process's last 50 ms
    may be missed), when 7-Zip was first and last seen at archive work, and how long it was
    stopped (SIGSTOP: AAM pauses 7-Zip while finished volumes wait for upload).
    """

    def __init__(self, pid, started, period=SAMPLE_SECONDS):
        super().__init__(daemon=True)
        self.pid, self.started, self.period = pid, started, period
        self.peak, self.peaks = 0, {"python": 0, "7zip": 0, "other": 0}
        self.processes = {}            # (pid, command) -> [command, class, peak RSS, CPU s]
        self.seven_zip_seen = None     # (first, last) perf_counter of a sample with 7-Zip
        self.seven_zip_stopped = 0.0
        self.own_cpu = 0.0             # this thread's CPU time (the bench's, not the tool's)
        self.done = threading.Event()

    def run(self):
        previous = self.started
        while not self.done.is_set():
            now = time.perf_counter()
            self.sample(now, now - previous)
            previous = now
            self.done.wait(self.period)
        self.own_cpu = time.thread_time()

    def sample(self, now, interval):
        totals = dict.fromkeys(self.peaks, 0)
        pending, stopped = [(self.pid, None)], False
        while pending:
            pid, parent_argv = pending.pop()
            seen = read_process(pid)
            if seen is None:
                continue
            pending.extend((child, seen.argv) for child in seen.children)
            if seen.argv == parent_argv:
                continue    # forked, not yet exec'd: its memory is still its parent's
            kind = process_class(seen.command)
            totals[kind] += seen.rss
            # keyed by command too: a shell that execs 7-Zip keeps its process id
            known = self.processes.setdefault((pid, seen.command),
                                              [seen.command, kind, 0, 0.0])
            known[2], known[3] = max(known[2], seen.rss), seen.cpu
            if kind == "7zip" and archive_work(seen.argv):
                first = self.seven_zip_seen[0] if self.seven_zip_seen else now
                self.seven_zip_seen = (first, now)
                stopped = stopped or seen.state == "T"
        self.seven_zip_stopped += interval if stopped else 0.0
        self.peak = max(self.peak, sum(totals.values()))
        for kind, total in totals.items():
            self.peaks[kind] = max(self.peaks[kind], total)

    def stop(self):
        self.done.set()
        self.join()

    def cpu_of(self, kind):
        return sum(cpu for _c, k, _rss, cpu in self.processes.values() if k == kind)


class EndpointMeter:
    """CPU time of the local S3 endpoint: a server process (moto) and threads of
    this, the bench's, process (the counting proxy in front of moto, or the sink).

    The threads' share is this process's CPU time less the sampler's (the
    main thread only waits).
    """

    def __init__(self, server_pid=None):
        self.pid = server_pid

    def cpu(self):
        """(server, threads) CPU seconds so far; the threads' includes the sampler's."""
        server = read_process(self.pid) if self.pid else None
        return (server.cpu if server else 0.0), time.process_time()


class Result:
    def __init__(self, wall=None, cpu=None, rss=None, uploaded=None, requests=None,
                 lists=None, status=0, note=""):
        self.wall, self.cpu, self.rss = wall, cpu, rss
        self.uploaded, self.requests, self.lists = uploaded, requests, lists
        self.status, self.note = status, note
        self.rss_python = self.rss_7zip = self.cpu_python = self.cpu_7zip = None
        self.endpoint_cpu = self.before_7zip = self.after_7zip = None
        self.endpoint_server_cpu = self.endpoint_local_cpu = None
        self.seven_zip_paused = None
        self.cut = False            # killed on purpose (measure's cut_after)
        self.wire_first = self.wire_last = None     # s after the start: first, last byte up
        self.peak_rate = None       # bytes/s over the busiest WireWatch.PEAK_WINDOW
        self.stored = None          # bytes the run added to the bucket
        self.load = None            # 1-minute load average when the run started
        self.processes = []         # [command, class, peak RSS, CPU s] per process

    @classmethod
    def not_available(cls, note):
        return cls(status=None, note=note)

    @property
    def ok(self):
        return (self.status == 0 or self.cut) and self.wall is not None

    def take_samples(self, sampler, ended):
        """The per-process figures; a run shorter than one sampling period has none."""
        self.rss = sampler.peak or None
        self.rss_python = sampler.peaks["python"] or None
        self.rss_7zip = sampler.peaks["7zip"] or None
        self.cpu_python, self.cpu_7zip = sampler.cpu_of("python"), sampler.cpu_of("7zip")
        self.processes = list(sampler.processes.values())
        if sampler.seven_zip_seen:
            first, last = sampler.seven_zip_seen
            self.before_7zip = first - sampler.started
            self.after_7zip = ended - last
            self.seven_zip_paused = sampler.seven_zip_stopped

    def as_dict(self):
        return dict(vars(self))


def cpu_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_average():
    with open("/proc/loadavg", encoding="ascii") as handle:
        return float(handle.read().split()[0])


def measure(argv, env, output, proxy=None, endpoint=None, cwd=None, stdin_text=None,
            period=SAMPLE_SECONDS, cut_after=None):
    """Run argv to its end; a Result with everything measured about its tree.

    cut_after: once that many request bytes have reached the proxy, the whole tree is
    killed (kill_tree), as a power cut would end it."""
    before = proxy.counters() if proxy else None
    endpoint_before = endpoint.cpu() if endpoint else None
    load = load_average()
    cpu_before = cpu_of_children()
    with open(output, "ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        started = time.perf_counter()
        process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out,
                                   stderr=subprocess.STDOUT,
                                   stdin=subprocess.PIPE if stdin_text else subprocess.DEVNULL)
        sampler = ProcessSampler(process.pid, started, period)
        sampler.start()
        wire = WireWatch(proxy, started) if proxy else None
        if stdin_text:
            process.stdin.write(stdin_text.encode())
            process.stdin.close()
        cut = cut_after is not None and cut_when_sent(
            process, proxy, before["bytes_received"] + cut_after)
        status = process.wait()
    ended = time.perf_counter()
    sampler.stop()
    # (wait4's ru_maxrss is no help for the peak: it counts the forked copy of
    # this Python process before exec.)
    result = Result(ended - started, cpu_of_children() - cpu_before, status=status)
    result.take_samples(sampler, ended)
    result.load = load
    if endpoint:
        (server, local), (server_before, local_before) = endpoint.cpu(), endpoint_before
        result.endpoint_server_cpu = server - server_before
        result.endpoint_local_cpu = local - local_before - sampler.own_cpu
        result.endpoint_cpu = result.endpoint_server_cpu + result.endpoint_local_cpu
    if proxy:
        wire.stop()
        result.wire_first, result.wire_last = wire.first, wire.last
        result.peak_rate = wire.peak_rate()
        after = proxy.counters()
        result.uploaded = after["bytes_received"] - before["bytes_received"]
        result.requests = after["requests"] - before["requests"]
        result.lists = (after["by_kind"].get("LIST", 0) - before["by_kind"].get("LIST", 0))
    if cut:
        result.cut, result.note = True, f"cut after {result.uploaded:,} bytes on the wire"
    elif status != 0:
        result.note = f"exit code {status}, see {output}"
    return result


class WireWatch(threading.Thread):
    """When request bytes of a run reached the proxy (seconds after started): the first
    and the last (the upload's own time, without the tool's start and end), and the
    highest rate over any PEAK_WINDOW seconds."""

    PEAK_WINDOW = 5.0

    def __init__(self, proxy, started):
        super().__init__(daemon=True)
        self.proxy, self.started = proxy, started
        self.samples = [(0.0, proxy.counters()["bytes_received"])]    # (s, bytes so far)
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.is_set():
            seen = self.samples[-1][1]
            if self.proxy.wait_for(lambda c: c["bytes_received"] != seen, 0.2):
                self.samples.append((time.perf_counter() - self.started,
                                     self.proxy.counters()["bytes_received"]))

    def stop(self):
        self.done.set()
        self.join()

    @property
    def first(self):
        return self.samples[1][0] if len(self.samples) > 1 else None

    @property
    def last(self):
        return self.samples[-1][0] if len(self.samples) > 1 else None

    def peak_rate(self):
        """Bytes per second over the busiest PEAK_WINDOW seconds (None if the upload
        was shorter): a rate limit holds if this stays under it."""
        peak, later = None, 1
        for at, sent in self.samples[1:]:
            while later < len(self.samples) and self.samples[later][0] < at + self.PEAK_WINDOW:
                later += 1
            if later == len(self.samples):
                break
            # the bytes counted from just after `at` up to the window's end
            end_at, end_sent = self.samples[later - 1]
            if end_at > at:
                rate = (end_sent - sent) / self.PEAK_WINDOW
                peak = rate if peak is None else max(peak, rate)
        return peak


def cut_when_sent(process, proxy, total):
    """Wait until the proxy has received total request bytes, then cut the power: the
    process's tree is killed and the line goes dead (what the tool had sent but the
    throttle had not let through is lost).  False if the process ended first."""
    while process.poll() is None:
        if proxy.wait_for(lambda c: c["bytes_received"] >= total, 0.5):
            kill_tree(process.pid, while_stopped=proxy.cut_connections)
            return True
    return False


def kill_tree(root, while_stopped=None):
    """SIGKILL a process and every descendant at once, as a power cut ends them: each
    is stopped first (SIGSTOP), so that none forks, nor acts on another's death, before
    all are killed; while_stopped() is called then.  The descendants are reaped here;
    the caller waits for the root."""
    become_subreaper()
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            tree.append(pid)
            seen = read_process(pid)
            pending.extend(seen.children if seen else [])
    if while_stopped:
        while_stopped()
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in tree[1:]:
        reap(pid, tree)


def reap(pid, tree):
    """Wait for a process of a killed tree: it becomes this process's child (a
    subreaper's) once its parent in the tree has died."""
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            parent = parent_of(pid)
            if parent is None or parent not in tree:
                return                  # gone, or not ours to wait for
            time.sleep(0.01)            # its parent is still dying


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def become_subreaper():
    """Orphans of this process's descendants become its children (prctl
    PR_SET_CHILD_SUBREAPER), so that the processes of a killed tree are reaped here,
    not left as zombies where the container's init does not reap."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


# ---------------------------------------------------------------- the tools

class Tool:
    name = ""

    def __init__(self, bench, tag=""):
        """tag: a repository (bucket, local state) of its own, e.g. one per scenario."""
        self.bench = bench
        self.suffix = f"-{tag}" if tag else ""
        self.output = os.path.join(bench.work, f"{self.name}{self.suffix}-output.txt")
        self.upload_limit = None        # bytes per second: the tool's own upload limit

    def available(self):
        return None     # or why not

    def restored_tree(self, target):
        """Where, under the restore target, the source tree comes back."""
        return target

    def prepare(self):
        pass

    def run(self, argv, env=None, **kwargs):
        return measure(argv, env or self.env(), self.output, endpoint=self.bench.endpoint,
                       period=self.bench.options.sample_seconds, **kwargs)

    def env(self):
        return dict(os.environ)

    def cleanup(self):
        pass


class AamTool(Tool):
    name = "aam"

    def env(self):
        bench = self.bench
        # PYTHONDONTWRITEBYTECODE is not a user's default: without it Python caches the
        # program's compiled form for the child pass, as on the user's computer.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "AAM_")) and k != "PYTHONDONTWRITEBYTECODE"}
        env.update({
            "AWS_ENDPOINT_URL": bench.proxy.endpoint_url,
            "AWS_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AAM_TEMP_ROOT": os.path.join(bench.work, "aam-temp"),
            "AAM_LOCK_FILE": os.path.join(bench.work, "aam.lock"),
            "AAM_STATE_DIR": os.path.join(bench.work, f"aam-state{self.suffix}"),
            "AAM_VOLUME_SIZE": str(bench.volume_size),
            "AAM_PIECE_SIZE": str(bench.options.piece_size),
            "AAM_COMPRESSION_LEVEL": str(bench.level),
            "AAM_RESTORE_POLL_SECONDS": "1",
            "BENCH_ARCHIVE_KEY": ARCHIVE_KEY,
            "BENCH_KEY_ID": ACCESS_KEY_ID,
            "BENCH_SECRET": SECRET_KEY,
        })
        if self.upload_limit:
            env["AAM_UPLOAD_LIMIT"] = str(self.upload_limit)
        return env

    def prepare(self):
        self.bench.aws.create_bucket(self.bucket)
        self.instructions = os.path.join(self.bench.work, "aam-instructions.txt")
        with open(self.instructions, "w", encoding="utf-8") as handle:
            handle.write(self.bench.source.rstrip("/") + "/\n\n\n")

    @property
    def bucket(self):
        return f"bench-aam{self.suffix}"

    def backup(self, _scenario, **measuring):
        bench = self.bench
        argv = [sys.executable, PROGRAM, "regular-backup", "user", sys.executable, "1", "0",
                os.path.join(bench.work, "aam-logs"), "False", "Bench", "bench@example.com",
                "owner@example.com", self.instructions, "q", "AWS", "", "False",
                "env:BENCH_ARCHIVE_KEY", self.bucket, LOCATION, "env:BENCH_KEY_ID",
                "env:BENCH_SECRET", "no", "no"]
        return self.run(argv, proxy=self.bench.proxy, **measuring)

    def restored_tree(self, target):
        # one numbered directory per source, beside restore-map.txt
        return os.path.join(target, "1")

    def restore(self, target):
        bench = self.bench
        argv = [sys.executable, PROGRAM, "one-step-aws-data-restoration",
                os.path.join(bench.work, "aam-logs"), "False", "Bench", "bench@example.com",
                "owner@example.com", "1", "env:BENCH_ARCHIVE_KEY", self.bucket, LOCATION,
                "env:BENCH_KEY_ID", "env:BENCH_SECRET", target]
        return self.run(argv, proxy=self.bench.proxy)


class SevenZipTool(Tool):
    name = "7zip"

    def available(self):
        return None if shutil.which(self.bench.seven_zip) else "7-Zip not found"

    def prepare(self):
        self.archives = os.path.join(self.bench.work, "7zip-archives")
        os.makedirs(self.archives)
        self.runs = 0

    def backup(self, scenario):
        bench = self.bench
        if scenario == "incr-none":
            return Result.not_available("nothing to archive")
        self.runs += 1
        target = os.path.join(self.archives, f"run{self.runs}")
        os.makedirs(target)
        if scenario == "full":
            sources = ["."]
        else:
            listing = os.path.join(bench.work, "7zip-changed.txt")
            with open(listing, "w", encoding="utf-8") as handle:
                handle.write("\n".join(bench.changed) + "\n")
            sources = ["@" + listing]
        argv = seven_zip_argv(bench.seven_zip, bench.level, bench.volume_size,
                              os.path.join(target, "backup.zip"), sources)
        return self.run(argv, cwd=bench.source, stdin_text=ARCHIVE_KEY + "\n")

    def restore(self, target):
        results = []
        for run in sorted(os.listdir(self.archives)):
            first = os.path.join(self.archives, run, "backup.zip.001")
            argv = [self.bench.seven_zip, "x", "-aoa", "-snl", "-bd", f"-o{target}",
                    first]
            # without -p, 7-Zip asks for the password on standard input
            results.append(self.run(argv, stdin_text=ARCHIVE_KEY + "\n"))
        return combine(results)

    def cleanup(self):
        shutil.rmtree(self.archives, ignore_errors=True)


def seven_zip_argv(seven_zip, level, volume_size, archive, sources):
    """The switches aam_auto_backup.py gives 7-Zip (seven_zip_add_argv)."""
    return [seven_zip, "a", "-tzip", f"-mx={level}", "-mem=AES256", "-mcu=on", "-p",
            f"-v{volume_size}b", "-bb1", "-bd", "-snl", "-sccUTF-8", "-y", archive] + sources


def combine(results):
    """Runs one after the other, as one (times add up; peak RSS: the larger)."""
    if not all(r.ok for r in results):
        return next(r for r in results if not r.ok)
    total = Result(0.0, 0.0, None, status=0)
    total.load = results[0].load
    for result in results:
        for name in ("wall", "cpu", "cpu_python", "cpu_7zip"):
            setattr(total, name, (getattr(total, name) or 0.0) + getattr(result, name))
        for name in ("rss", "rss_python", "rss_7zip"):
            peak = max(getattr(total, name) or 0, getattr(result, name) or 0)
            setattr(total, name, peak or None)
        total.processes += result.processes
    return total


class ResticTool(Tool):
    name = "restic"

    def available(self):
        return None if shutil.which("restic") else "restic not installed"

    def env(self):
        bench = self.bench
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RESTIC_"))}
        env.update({
            "RESTIC_REPOSITORY": f"s3:{bench.proxy.endpoint_url}/{self.bucket}",
            "RESTIC_PASSWORD": ARCHIVE_KEY,
            "RESTIC_CACHE_DIR": os.path.join(bench.work, "restic-cache"),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        return env

    @property
    def bucket(self):
        return f"bench-restic{self.suffix}"

    def prepare(self):
        self.bench.aws.create_bucket(self.bucket)
        result = self.run(["restic", "init"])
        if not result.ok:
            raise RuntimeError(f"restic init failed: {result.note}")

    def backup(self, _scenario, **measuring):
        # --limit-upload is in KiB/s
        limit = ["--limit-upload", str(self.upload_limit // 1024)] if self.upload_limit else []
        return self.run(["restic", "backup", "--host", LOCATION, "--quiet"] + limit + ["."],
                        cwd=self.bench.source, proxy=self.bench.proxy, **measuring)

    def restore(self, target):
        return self.run(["restic", "restore", "latest", "--host", LOCATION, "--target",
                         target], proxy=self.bench.proxy)


class DuplicityTool(Tool):
    name = "duplicity"

    def available(self):
        if not shutil.which("duplicity"):
            return "duplicity not installed"
        python = _shebang_python(shutil.which("duplicity"))
        probe = subprocess.run([python, "-c", "import boto3"], capture_output=True)
        return None if probe.returncode == 0 else f"boto3 missing for {python}"

    def env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update({
            "PASSPHRASE": ARCHIVE_KEY,
            "GNUPGHOME": self.gnupg_home,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        })
        return env

    @property
    def gnupg_home(self):
        # gpg-agent's sockets live in GNUPGHOME, and a Unix socket path is limited to
        # 107 bytes: a deep work directory made gpg fail (exit 31), so use a short one.
        if not hasattr(self, "_gnupg_home"):
            self._gnupg_home = tempfile.mkdtemp(prefix="aam-gpg-", dir="/tmp")
        return self._gnupg_home

    def common(self):
        return ["--s3-endpoint-url", self.bench.proxy.endpoint_url,
                "--archive-dir", os.path.join(self.bench.work, "duplicity-cache"),
                "--name", "bench", "--no-print-statistics", "--verbosity", "warning"]

    def prepare(self):
        self.bench.aws.create_bucket("bench-duplicity")
        self.url = "boto3+s3://bench-duplicity/bench"

    def backup(self, scenario):
        action = "full" if scenario == "full" else "incremental"
        return self.run(["duplicity", action] + self.common() + [self.bench.source, self.url],
                        proxy=self.bench.proxy)

    def restore(self, target):
        return self.run(["duplicity", "restore"] + self.common() + [self.url, target],
                        proxy=self.bench.proxy)

    def cleanup(self):
        # gpg may have started an agent for this GNUPGHOME: stop exactly that one.
        with contextlib.suppress(OSError):
            subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=self.env(),
                           capture_output=True, timeout=30)
        shutil.rmtree(self.gnupg_home, ignore_errors=True)


def _shebang_python(script):
    with open(script, "rb") as handle:
        first = handle.readline().decode(errors="replace").strip()
    return first[2:].split()[0] if first.startswith("#!") else sys.executable


TOOL_CLASSES = {"aam": AamTool, "7zip": SevenZipTool, "restic": ResticTool,
                "duplicity": DuplicityTool}


# ---------------------------------------------------------------- the run

class Bench:
    """One work directory and one local S3 endpoint; the tools through the scenarios."""

    def __init__(self, options, scenarios=SCENARIOS):
        self.options = options
        # the sink keeps no volume data: nothing to restore from
        self.scenarios = tuple(s for s in scenarios
                               if s != "restore" or options.endpoint != "sink")
        self.work = tempfile.mkdtemp(prefix="aam-bench-", dir=options.work or "/var/tmp")
        self.source = os.path.join(self.work, "src", "data")
        self.volume_size = options.volume_size
        self.level = options.level
        self.seven_zip = find_seven_zip()
        self.changed = []
        self.expected = None
        self.aws = self.proxy = self.endpoint = None

    def run(self, tree):
        """{(scenario, tool name): Result}, {name: tool} for the tree in self.source."""
        results = {}
        with self.local_s3() as (self.aws, self.proxy, self.endpoint):
            tools = self.tools()
            try:
                for scenario in self.scenarios:
                    if scenario == "incr-1%":
                        self.changed = tree.change(0.01)
                        say(f"Changed {len(self.changed)} files (1%).")
                    for tool in tools.values():
                        results[(scenario, tool.name)] = self.run_one(tool, scenario)
            finally:
                for tool in tools.values():
                    tool.cleanup()
        return results, tools

    @contextlib.contextmanager
    def local_s3(self):
        """(bucket maker, request counter, endpoint meter) of the chosen endpoint."""
        if self.options.endpoint == "sink":
            with S3Sink() as sink:
                yield sink, sink, EndpointMeter()
            return
        with LocalAws(niceness=self.options.endpoint_niceness) as aws, \
                FaultProxy(aws.endpoint_url) as proxy:
            yield aws, proxy, EndpointMeter(aws.server_pid)

    def tools(self):
        tools = {}
        for name in self.options.tools:
            tool = TOOL_CLASSES[name](self)
            why_not = tool.available()
            if why_not:
                say(f"Skipping {name}: {why_not}")
                continue
            tool.prepare()
            tools[name] = tool
        return tools

    def run_one(self, tool, scenario):
        say(f"{scenario:10} {tool.name:10} ...", end="")
        if scenario == "restore":
            target = os.path.join(self.work, f"restored-{tool.name}")
            result = tool.restore(target)
            if result.ok:
                result.note = self.check_restore(tool.restored_tree(target))
            shutil.rmtree(target, ignore_errors=True)
        else:
            result = tool.backup(scenario)
        say(f" {describe(result)}")
        return result

    def check_restore(self, target):
        """Every source file must come back (by count and size; paths differ per tool)."""
        if self.expected is None:           # changes keep each file's size
            self.expected = tree_summary(self.source)
        got = tree_summary(target)
        return "" if got == self.expected else f"restored {got}, expected {self.expected}"


def find_seven_zip():
    """The 7-Zip AAM uses: AAM_7ZIP, else 7zz, 7z or 7za on PATH."""
    return os.environ.get("AAM_7ZIP") or next(
        (name for name in ("7zz", "7z", "7za") if shutil.which(name)), "7zz")


def scan_time(source):
    """The incremental's scan on its own (the walk, nothing changed), or None when the
    module no longer has the functions called here (the bench outlives them)."""
    try:
        platform = aam.current_platform()
        instructions = aam.parse_instructions(source + "/\n\n\n", "bench", platform)
        plan = aam.plan_backup(instructions, platform).sources[0]
        started = time.perf_counter()
        if hasattr(aam, "TreeWalk"):
            # a list or a stream of the changed files: read to its end either way
            collections.deque(aam.TreeWalk(plan.mount, plan, platform,
                                           aam.utc_now()).files(), maxlen=0)
        else:                                           # version 1.0.0
            aam.walk_selection(plan.mount, plan, platform, aam.utc_now())
    except (AttributeError, TypeError) as problem:
        say(f"(no scan time: {problem})")
        return None
    return time.perf_counter() - started


def failures(results):
    """The runs that failed: a non-zero exit, or a restore that is not the tree."""
    return [key for key, result in results.items()
            if not (result.ok or result.status is None)
            or (key[0] == "restore" and result.note)]


def endpoint_text(options):
    if options.endpoint == "sink":
        return "the sink (tools/s3_sink.py)"
    return f"moto at niceness {options.endpoint_niceness}"


def say(text, end="\n"):
    print(text, end=end, flush=True)


def megabytes(rss):
    """Peak RSS in MB; '<1 sample' for a run too short to be sampled."""
    return "<1 sample" if rss is None else f"{rss / 1e6:.0f}"


def seconds(value):
    return "" if value is None else f"{value:.2f}"


def describe(result):
    if not result.ok:
        return f"n/a ({result.note})"
    text = (f"{result.wall:.2f} s wall, {result.cpu:.2f} s CPU, {megabytes(result.rss)} MB "
            f"RSS (Python {megabytes(result.rss_python)}, 7-Zip {megabytes(result.rss_7zip)})")
    if result.uploaded is not None:
        text += (f", {result.uploaded / 1e6:.1f} MB up, {result.requests} requests, "
                 f"endpoint {result.endpoint_cpu:.2f} s CPU")
    text += f", load {result.load:.2f}"
    return text + (f" [{result.note}]" if result.note else "")


def table(results, tools):
    """One Markdown table; the last column is AAM's wall time over this tool's."""
    lines = ["| scenario | tool | wall s | CPU s | peak RSS MB | of which Python | "
             "of which 7-Zip | uploaded MB | S3 requests (LIST) | endpoint CPU s | "
             "AAM ÷ tool (wall) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for scenario in SCENARIOS:
        ours = results.get((scenario, "aam"))
        for name in tools:
            result = results.get((scenario, name))
            if result is None:
                continue        # not run against this endpoint
            if not result.ok:
                lines.append(f"| {scenario} | {name} | n/a | | | | | | | | |")
                continue
            ratio = (f"{ours.wall / result.wall:.2f}" if ours is not None and ours.ok
                     else "n/a")
            uploaded = "" if result.uploaded is None else f"{result.uploaded / 1e6:.1f}"
            requests = "" if result.requests is None else f"{result.requests} ({result.lists})"
            lines.append(f"| {scenario} | {name} | {result.wall:.2f} | {result.cpu:.2f} | "
                         f"{megabytes(result.rss)} | {megabytes(result.rss_python)} | "
                         f"{megabytes(result.rss_7zip)} | {uploaded} | {requests} | "
                         f"{seconds(result.endpoint_cpu) if uploaded else ''} | {ratio} |")
    return "\n".join(lines)


def machine():
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle
                          if line.startswith("model name")), "")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for argv in ([find_seven_zip()], ["restic", "version"], ["duplicity", "--version"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
            first = next((line for line in out.splitlines() if line.strip()), "")
            versions.append(first.strip()[:40])
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB RAM, Python "
            f"{sys.version.split()[0]}; " + "; ".join(versions))


# ---------------------------------------------------------------- compression levels

def compression_sweep(options):
    """7-Zip's size and time per level on the bench tree and on compressed data."""
    work = tempfile.mkdtemp(prefix="aam-bench-", dir=options.work or "/var/tmp")
    seven_zip = find_seven_zip()
    trees = {"bench tree": os.path.join(work, "mixed"),
             "compressed (photo-like)": os.path.join(work, "compressed")}
    say("Generating the trees ...")
    BenchTree(trees["bench tree"], options.files, options.total_bytes, options.seed).generate()
    compressed_tree(trees["compressed (photo-like)"], options.files, options.total_bytes,
                    options.seed)
    lines = ["| data | -mx | archive MB | size vs -mx5 | wall s | CPU s |",
             "|---|---:|---:|---:|---:|---:|"]
    output = os.path.join(work, "compression-output.txt")
    for label, root in trees.items():
        _count, size = tree_summary(root)
        rows = {}
        for level in options.levels:
            target = os.path.join(work, "archive")
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(target)
            argv = seven_zip_argv(seven_zip, level, options.volume_size,
                                  os.path.join(target, "backup.zip"), ["."])
            result = measure(argv, dict(os.environ), output, cwd=root,
                             stdin_text=ARCHIVE_KEY + "\n")
            archived = tree_summary(target)[1]
            rows[level] = (archived, result)
            say(f"{label}: -mx{level}: {archived / 1e6:.1f} MB of {size / 1e6:.1f} MB, "
                f"{describe(result)}")
        base = rows.get(5, next(iter(rows.values())))[0]
        for level, (archived, result) in rows.items():
            lines.append(f"| {label} | {level} | {archived / 1e6:.1f} | "
                         f"{100 * (archived / base - 1):+.1f}% | {result.wall:.2f} | "
                         f"{result.cpu:.2f} |")
    print("\n" + "\n".join(lines))
    print(f"\nMachine: {machine()}")
    if not options.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------- scale: the file count

SCALE_SCENARIOS = ("full", "incr-none", "restore")


class ScaleStep:
    """One file count: its tree, the time it took to make, and the results."""

    def __init__(self, count, tree, generation, results, tools, elapsed):
        self.count, self.tree, self.generation = count, tree, generation
        self.results, self.tools, self.elapsed = results, tools, elapsed

    def get(self, scenario, tool):
        result = self.results.get((scenario, tool))
        return result if result is not None and result.ok else None


def scale_step(options, count):
    started = time.perf_counter()
    bench = Bench(options, SCALE_SCENARIOS)
    try:
        say(f"\n== {count:,} files of ~{options.mean_size:,} bytes (load "
            f"{load_average():.2f}) in {bench.source}")
        tree = SmallFileTree(bench.source, count, options.mean_size, options.seed).generate()
        generation = time.perf_counter() - started
        say(f"  generated {tree.total_bytes / 1e6:,.1f} MB in {generation:.1f} s")
        results, tools = bench.run(tree)
    finally:
        if not options.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    return ScaleStep(count, tree, generation, results, list(tools),
                     time.perf_counter() - started)


def scale_table(steps):
    """Per file count and scenario: AAM and plain 7-Zip, the RSS split by process."""
    lines = ["| files | scenario | tool | wall s | CPU s | our RSS MB | 7-Zip RSS MB | "
             "endpoint CPU s | load | AAM ÷ 7-Zip (wall) | AAM ÷ 7-Zip (CPU) |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for step in steps:
        for scenario in SCALE_SCENARIOS:
            ours, floor = step.get(scenario, "aam"), step.get(scenario, "7zip")
            for name in step.tools:
                result = step.get(scenario, name)
                head = f"| {step.count:,} | {scenario} | {name} |"
                if result is None:
                    lines.append(head + " n/a | | | | | | | |")
                    continue
                aam_row = name == "aam"
                ratios = (f"{ours.wall / floor.wall:.2f} | {ours.cpu / floor.cpu:.2f}"
                          if aam_row and floor else " | ")
                lines.append(
                    f"{head} {result.wall:.2f} | {result.cpu:.2f} | "
                    f"{megabytes(result.rss_python) if aam_row else ''} | "
                    f"{megabytes(result.rss_7zip)} | "
                    f"{seconds(result.endpoint_cpu) if aam_row else ''} | "
                    f"{result.load:.2f} | {ratios} |")
    return "\n".join(lines)


def phase_table(steps):
    """AAM's time around its 7-Zip run: before it starts, while it runs, after it ends."""
    lines = ["| files | scenario | wall s | before 7-Zip s | 7-Zip running s | "
             "of which paused s | after 7-Zip s | our CPU s | 7-Zip CPU s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for step in steps:
        for scenario in SCALE_SCENARIOS:
            result = step.get(scenario, "aam")
            if result is None or result.before_7zip is None:
                continue
            running = result.wall - result.before_7zip - result.after_7zip
            lines.append(f"| {step.count:,} | {scenario} | {result.wall:.2f} | "
                         f"{result.before_7zip:.2f} | {running:.2f} | "
                         f"{result.seven_zip_paused:.2f} | {result.after_7zip:.2f} | "
                         f"{result.cpu_python:.2f} | {result.cpu_7zip:.2f} |")
    return "\n".join(lines)


def per_file(later, earlier, attribute, factor):
    values = [getattr(r, attribute) if r else None for r in (later[1], earlier[1])]
    if None in values:
        return ""
    return f"{(values[0] - values[1]) * factor / (later[0] - earlier[0]):.2f}"


def growth_table(steps):
    """How memory and CPU time grow per file, between consecutive file counts (CPU time,
    not wall time: it moves much less with the machine's load)."""
    lines = ["| scenario | files | our RSS KB/file | AAM's 7-Zip RSS KB/file | "
             "plain 7-Zip RSS KB/file | AAM CPU µs/file | plain 7-Zip CPU µs/file |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for earlier, later in zip(steps, steps[1:]):
        for scenario in SCALE_SCENARIOS:
            ours = [(s.count, s.get(scenario, "aam")) for s in (later, earlier)]
            floor = [(s.count, s.get(scenario, "7zip")) for s in (later, earlier)]
            lines.append(
                f"| {scenario} | {earlier.count:,} → {later.count:,} | "
                f"{per_file(*ours, 'rss_python', 1e-3)} | {per_file(*ours, 'rss_7zip', 1e-3)} | "
                f"{per_file(*floor, 'rss_7zip', 1e-3)} | {per_file(*ours, 'cpu', 1e6)} | "
                f"{per_file(*floor, 'cpu', 1e6)} |")
    return "\n".join(lines)


def scale(options):
    started = time.perf_counter()
    steps = [scale_step(options, count) for count in options.counts]
    print("\n" + scale_table(steps))
    print("\nAAM's time around 7-Zip (7-Zip paused: stopped while finished volumes waited "
          "for upload):\n\n" + phase_table(steps))
    if len(steps) > 1:
        print("\n" + growth_table(steps))
    print()
    for step in steps:
        print(f"{step.count:,} files, {step.tree.total_bytes / 1e6:,.1f} MB: tree made in "
              f"{step.generation:.0f} s, whole step {step.elapsed:.0f} s.")
    print(f"Total {time.perf_counter() - started:.0f} s; volume size {options.volume_size:,} "
          f"bytes; -mx{options.level}; endpoint {endpoint_text(options)}; load "
          f"average at the end {load_average():.2f}.")
    print(f"Machine: {machine()}")
    if options.json:
        write_json(options.json, {
            "mode": "scale", "volume_size": options.volume_size, "level": options.level,
            "steps": [{"files": s.count, "bytes": s.tree.total_bytes, "tools": s.tools,
                       "generation_seconds": s.generation, "seconds": s.elapsed,
                       "results": results_json(s.results)} for s in steps]})
    return 1 if any(failures(step.results) for step in steps) else 0


def results_json(results):
    return {f"{scenario}/{tool}": result.as_dict() for (scenario, tool), result in
            results.items()}


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)


# ---------------------------------------------------------------- uplink: a slow line, cut

UPLINK_SCENARIOS = ("uplink", "cut", "limit")
UPLINK_TOOLS = ("aam", "restic")
DEFAULT_RATE = "40Mbit"
UPLINK_VOLUME_SIZE = 16 * 1024 * 1024
CUT_FRACTION = 0.6
# The targets: a cut and continued full puts at most 1.10x an uncut one's bytes
# on the wire; an uncut full takes at most 1.05x the wire time of its bytes.
CUT_TARGET, UPLINK_TARGET = 1.10, 1.05


def incompressible_tree(root, files, total_bytes, seed):
    """files of random bytes (nothing to compress: the bytes on the wire are the
    tree's), sizes uniform in 1/4..7/4 of the mean, 100 per directory; their total."""
    rng = random.Random(seed)
    mean = total_bytes // files
    total = 0
    for index in range(files):
        size = rng.randint(max(1, mean // 4), max(1, mean * 7 // 4))
        path = os.path.join(root, f"d{index // 100:03d}", f"r{index:05d}.bin")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(rng.randbytes(size))
        total += size
    os.sync()
    return total


class UplinkRun:
    """One tool in one uplink scenario: its runs (two for a cut one) and the bucket."""

    def __init__(self, scenario, tool, runs, stored):
        self.scenario, self.tool, self.runs, self.stored = scenario, tool, runs, stored

    @property
    def ok(self):
        return all(run.ok for run in self.runs)

    @property
    def wall(self):
        return sum(run.wall for run in self.runs)

    @property
    def wire(self):
        return sum(run.uploaded for run in self.runs)

    def upload_seconds(self):
        """From the first to the last request byte (one run)."""
        run = self.runs[0]
        return None if run.wire_first is None else run.wire_last - run.wire_first

    def time_split(self, rate):
        """Seconds (before the first request byte, the link idle between the first and
        the last byte, after the last byte), summed over the runs; with the bytes' wire
        time they add up to the wall time."""
        before = idle = after = 0.0
        for run in self.runs:
            if run.wire_first is None:
                before += run.wall
                continue
            before += run.wire_first
            idle += run.wire_last - run.wire_first - run.uploaded / rate
            after += run.wall - run.wire_last
        return before, idle, after

    def as_dict(self):
        return {"scenario": self.scenario, "tool": self.tool, "stored": self.stored,
                "wall": self.wall, "wire": self.wire,
                "runs": [run.as_dict() for run in self.runs]}


def bucket_bytes(s3, bucket):
    """{key: size} of a bucket."""
    sizes = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        sizes.update((item["Key"], item["Size"]) for item in page.get("Contents", []))
    return sizes


class UplinkBench(Bench):
    """The tools over a throttled link: a full backup (uplink), one cut at CUT_FRACTION
    of its bytes and run again (cut), and one under the tool's own limit (limit)."""

    def __init__(self, options):
        super().__init__(options, ())
        self.rate = options.rate
        self.s3 = None

    def run(self, _tree=None):
        """[UplinkRun] per tool and scenario, {name: tool}."""
        runs, tools = [], {}
        scenarios = self.options.scenarios
        with self.local_s3() as (self.aws, self.proxy, self.endpoint):
            self.s3 = self.aws.client("s3")
            for name in self.options.tools:
                why_not = TOOL_CLASSES[name](self).available()
                if why_not:
                    say(f"Skipping {name}: {why_not}")
                    continue
                tools[name] = name
                uncut = None
                if "uplink" in scenarios or "cut" in scenarios:
                    uncut = self.scenario(name, "uplink")
                    runs.append(uncut)
                if "cut" in scenarios and uncut.ok:
                    runs.append(self.scenario(name, "cut", round(CUT_FRACTION * uncut.stored)))
                if "limit" in scenarios:
                    runs.append(self.scenario(name, "limit"))
        return runs, tools

    def scenario(self, name, scenario, cut_after=None):
        """Run one tool through one scenario in a bucket of its own; the bucket is
        emptied afterwards (the server keeps objects in memory)."""
        tool = TOOL_CLASSES[name](self, tag=scenario)
        if scenario == "limit":
            tool.upload_limit = self.rate
        self.proxy.limit_upload(None if scenario == "limit" else self.rate)
        try:
            tool.prepare()
            before = bucket_bytes(self.s3, tool.bucket)
            runs = [self.backup(tool, f"{scenario} run 1", cut_after=cut_after)]
            if runs[0].cut:
                runs.append(self.backup(tool, f"{scenario} run 2"))
            after = bucket_bytes(self.s3, tool.bucket)
            stored = sum(size for key, size in after.items() if before.get(key) != size)
            for key in after:
                self.s3.delete_object(Bucket=tool.bucket, Key=key)
        finally:
            self.proxy.limit_upload(None)
            tool.cleanup()
        return UplinkRun(scenario, name, runs, stored)

    def backup(self, tool, label, cut_after=None):
        say(f"{label:13} {tool.name:7} ...", end="")
        result = tool.backup("full", cut_after=cut_after)
        say(f" {describe(result)}")
        return result


def uplink_table(runs, rate):
    """The throttled runs: bytes on the wire against the archive's, wall time against
    the wire time of those bytes, and where the difference went: before the first
    byte, the link idle between the first and the last, after the last byte."""
    uncut = {run.tool: run for run in runs if run.scenario == "uplink" and run.ok}
    lines = ["| scenario | tool | runs | wall s | on the wire MB | stored MB | "
             "wire ÷ archive | wire time s | wall ÷ wire time | before first byte s | "
             "link idle s | after last byte s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        if run.scenario == "limit":
            continue
        head = f"| {run.scenario} | {run.tool} | {len(run.runs)} |"
        if not run.ok:
            lines.append(head + " n/a |" + " |" * 8)
            continue
        wire_time = run.wire / rate
        # the archive: what an uncut run stored; a cut run's pair against an uncut run
        base = run.stored if run.scenario == "uplink" else getattr(uncut.get(run.tool),
                                                                   "wire", None)
        ratio = f"{run.wire / base:.2f}" if base else "n/a"
        before, idle, after = run.time_split(rate)
        lines.append(f"{head} {run.wall:.1f} | {run.wire / 1e6:.1f} | {run.stored / 1e6:.1f} | "
                     f"{ratio} | {wire_time:.1f} | {run.wall / wire_time:.2f} | {before:.1f} | "
                     f"{idle:.1f} | {after:.1f} |")
    return "\n".join(lines)


def limit_table(runs, rate):
    """The tools' own upload limit over an unthrottled link: the rate achieved, its
    busiest seconds, and the upload's time against the same tool's over the throttled
    link (about 1: the limit paces the upload as a link of that rate would)."""
    uncut = {run.tool: run for run in runs if run.scenario == "uplink" and run.ok}
    lines = ["| tool | its limit (bytes/s) | on the wire MB | first to last byte s | "
             "mean ÷ limit | busiest 5 s ÷ limit | first to last byte ÷ uplink run's |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        if run.scenario != "limit":
            continue
        seconds = run.upload_seconds() if run.ok else None
        if not seconds:
            lines.append(f"| {run.tool} | {rate:,} | n/a | | | | |")
            continue
        # restic takes KiB/s: its limit is the rate rounded down to whole KiB
        limit = rate // 1024 * 1024 if run.tool == "restic" else rate
        peak = run.runs[0].peak_rate
        base = uncut.get(run.tool)
        lines.append(f"| {run.tool} | {limit:,} | {run.wire / 1e6:.1f} | {seconds:.1f} | "
                     f"{run.wire / seconds / limit:.3f} | "
                     f"{'n/a' if peak is None else f'{peak / limit:.3f}'} | "
                     f"{f'{seconds / base.upload_seconds():.3f}' if base else 'n/a'} |")
    return "\n".join(lines)


def uplink_targets(runs, rate):
    """AAM's figures against the issue's targets."""
    ours = {run.scenario: run for run in runs if run.tool == "aam" and run.ok}
    lines = []
    if "uplink" in ours and "cut" in ours:
        ratio = ours["cut"].wire / ours["uplink"].wire
        lines.append(f"AAM cut and continued: {ratio:.2f}x the bytes of an uncut full "
                     f"(target <= {CUT_TARGET:.2f}).")
    if "uplink" in ours:
        run = ours["uplink"]
        lines.append(f"AAM uncut full: {run.wall / (run.wire / rate):.2f}x its bytes' wire "
                     f"time (target <= {UPLINK_TARGET:.2f}).")
    return lines


def uplink(options):
    bench = UplinkBench(options)
    try:
        say(f"Generating {options.files:,} files of random bytes (~{options.total_bytes / 1e6:,.0f}"
            f" MB) in {bench.source} ...")
        total = incompressible_tree(bench.source, options.files, options.total_bytes,
                                    options.seed)
        say(f"  {total / 1e6:,.1f} MB; link {options.rate:,} bytes/s "
            f"({options.rate * 8 / 1e6:g} Mbit/s)")
        runs, tools = bench.run()
    finally:
        if not options.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    print()
    print(uplink_table(runs, options.rate))
    if any(run.scenario == "limit" for run in runs):
        print("\nThe tool's own upload limit at the same rate, the link not throttled:\n")
        print(limit_table(runs, options.rate))
    print()
    for line in uplink_targets(runs, options.rate):
        print(line)
    print(f"Tree: {options.files:,} files of random bytes, {total / 1e6:,.1f} MB; volume size "
          f"{options.volume_size:,} bytes; link {options.rate:,} bytes/s; cut at "
          f"{CUT_FRACTION:.0%} of the stored bytes of an uncut run; endpoint "
          f"{endpoint_text(options)}; load average at the end {load_average():.2f}.")
    print(f"Machine: {machine()}")
    if options.json:
        write_json(options.json, {
            "mode": "uplink", "tools": list(tools), "files": options.files, "bytes": total,
            "volume_size": options.volume_size, "rate": options.rate,
            "runs": [run.as_dict() for run in runs]})
    return 0 if all(run.ok for run in runs) else 1


# ---------------------------------------------------------------- command line

def parse_count_list(text):
    """'10000,100000' or '10k,1M' -> [10000, 100000] (file counts, powers of 1000)."""
    counts = [parse_size(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not a list of file counts: {text!r}")
    return counts


def parse_options(argv):
    parser = argparse.ArgumentParser(
        description="Benchmark AAM Auto Backup against restic, duplicity and plain 7-Zip.")
    parser.add_argument("mode", nargs="?", default="compare",
                        choices=("compare", "compression", "scale", "uplink"),
                        help="compare (default): the four tools; compression: 7-Zip levels; "
                             "scale: AAM and plain 7-Zip against the number of small files; "
                             "uplink: AAM and restic over a throttled link, cut and continued")
    parser.add_argument("--files", type=int,
                        help="files in the tree (default 10,000; uplink mode 200)")
    parser.add_argument("--total-bytes", type=parse_size,
                        help="tree size, e.g. 500M or 5G (default: 50 KB per file; uplink "
                             "mode 200M)")
    parser.add_argument("--counts", type=parse_count_list, default=[10_000, 100_000, 1_000_000],
                        help="scale mode: file counts, e.g. 10k,100k (default 10k,100k,1M)")
    parser.add_argument("--mean-size", type=parse_size, default=4000,
                        help="scale mode: mean file size (default 4k; uniform in 1/4..7/4 "
                             "of it)")
    parser.add_argument("--volume-size", type=parse_size,
                        help="7-Zip volume size for AAM and plain 7-Zip (default 64 MiB: "
                             "the 0.5 GB tree in several volumes, as a real backup is; "
                             "uplink mode 16 MiB)")
    parser.add_argument("--piece-size", type=parse_size,
                        default=getattr(aam, "DEFAULT_PIECE_SIZE", 64 * 1024 * 1024),
                        help="AAM's piece size (AAM_PIECE_SIZE; default: the program's)")
    parser.add_argument("--rate", type=option_types.rate, default=DEFAULT_RATE,
                        help=f"uplink mode: the link's rate, in the forms of AAM_UPLOAD_LIMIT "
                             f"(default {DEFAULT_RATE}: 5,000,000 bytes/s)")
    parser.add_argument("--scenarios", default=",".join(UPLINK_SCENARIOS),
                        help="uplink mode: from uplink (a full backup over the throttled "
                             "link), cut (cut at 60%% of its bytes, run again; runs uplink "
                             "too), limit (the tool's own limit at the rate, the link not "
                             "throttled); default: all")
    parser.add_argument("--level", type=int, default=DEFAULT_LEVEL,
                        help="7-Zip -mx level for AAM and plain 7-Zip (default: AAM's)")
    parser.add_argument("--levels", default="0,1,3,5,7,9",
                        help="compression mode: the levels to try")
    parser.add_argument("--tools", help=f"comma-separated, from {','.join(TOOLS)} (default: "
                                        "all; scale mode: aam,7zip)")
    parser.add_argument("--endpoint", choices=("moto", "sink"), default="moto",
                        help="the local S3 endpoint: moto (default; every scenario) or sink "
                             "(tools/s3_sink.py: discards the volumes at a fraction of moto's "
                             "CPU; no restore)")
    parser.add_argument("--endpoint-niceness", type=int,
                        help=f"niceness of the local S3 endpoint (default {ENDPOINT_NICENESS}, "
                             f"uplink mode {UPLINK_ENDPOINT_NICENESS}; "
                             "0 to check that a ratio does not depend on it)")
    parser.add_argument("--sample-seconds", type=float, default=SAMPLE_SECONDS,
                        help=f"how often /proc is sampled (default {SAMPLE_SECONDS}; a tiny "
                             "run needs less to see its short 7-Zip runs)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--work", help="where to make the work directory (default /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args(argv)
    uplink_mode = options.mode == "uplink"
    if options.files is None:
        options.files = 200 if uplink_mode else 10_000
    if options.total_bytes is None:
        options.total_bytes = 200_000_000 if uplink_mode else options.files * 50_000
    if options.volume_size is None:
        options.volume_size = UPLINK_VOLUME_SIZE if uplink_mode else DEFAULT_VOLUME_SIZE
    if options.endpoint_niceness is None:
        options.endpoint_niceness = (UPLINK_ENDPOINT_NICENESS if uplink_mode
                                     else ENDPOINT_NICENESS)
    if uplink_mode and options.endpoint == "sink":
        parser.error("the uplink mode needs the proxy's throttle: --endpoint moto")
    options.scenarios = [s.strip() for s in options.scenarios.split(",") if s.strip()]
    if set(options.scenarios) - set(UPLINK_SCENARIOS):
        parser.error(f"--scenarios: choose from {','.join(UPLINK_SCENARIOS)}")
    default_tools = {"scale": "aam,7zip", "uplink": ",".join(UPLINK_TOOLS)}.get(
        options.mode, ",".join(TOOLS))
    options.tools = [t.strip() for t in (options.tools or default_tools).split(",")
                     if t.strip()]
    unknown = set(options.tools) - set(UPLINK_TOOLS if uplink_mode else TOOLS)
    if unknown or "aam" not in options.tools:
        parser.error(f"--tools: unknown {sorted(unknown)}" if unknown
                     else "--tools must include aam")
    options.levels = [int(level) for level in options.levels.split(",")]
    return options


def compare(options):
    bench = Bench(options)
    try:
        say(f"Generating {options.files:,} files (~{options.total_bytes / 1e9:.2f} GB) in "
            f"{bench.source} ...")
        tree = BenchTree(bench.source, options.files, options.total_bytes,
                         options.seed).generate()
        say(f"  {len(tree.files):,} files, {tree.total_bytes / 1e6:,.1f} MB")
        results, tools = bench.run(tree)
        scan_seconds = scan_time(bench.source)
    finally:
        if not options.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
    print()
    print(table(results, tools))
    print(f"\nTree: {len(tree.files):,} files, {tree.total_bytes / 1e6:,.1f} MB; volume size "
          f"{options.volume_size:,} bytes; -mx{options.level}; endpoint "
          f"{endpoint_text(options)}; load average at the end {load_average():.2f}.")
    if scan_seconds is not None:
        print(f"Incremental scan alone (the walk, nothing changed): {scan_seconds:.3f} s "
              f"for {len(tree.files):,} files.")
    print(f"Machine: {machine()}")
    if options.json:
        write_json(options.json, {
            "mode": "compare", "tools": list(tools), "files": len(tree.files),
            "bytes": tree.total_bytes, "volume_size": options.volume_size,
            "level": options.level, "scan_seconds": scan_seconds,
            "results": results_json(results)})
    return 1 if failures(results) else 0


def main(argv=None):
    options = parse_options(sys.argv[1:] if argv is None else argv)
    modes = {"compare": compare, "compression": compression_sweep, "scale": scale,
             "uplink": uplink}
    return modes[options.mode](options)


if __name__ == "__main__":
    sys.exit(main())
