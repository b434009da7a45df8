"""No process of a backup outlives it, whatever is killed and whenever; the next run ends
exactly what an earlier one left.

Real parts: the CLI, the real child pass, real 7-Zip, a real moto server behind the
counting proxy.  The proxy holds every upload, a link so slow that the upload throttle
stops 7-Zip (SIGSTOP) and keeps it stopped: the state in which a killed backup used to
leave 7-Zip stopped for good.  Every wait is for an event read from /proc (a process
stopped, a process gone), never for a time.
"""

import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

import aam_auto_backup as aab
from conftest import PROGRAM, ok, snapshot, wait_for

VOLUME_SIZE = "1000000"          # 12 MB of files: a dozen volumes, 7-Zip stopped after 2
HELD_SECONDS = 3600              # each upload waits this long at the proxy: "forever"
AWS_ONLY = {"destinations": "AWS", "mirror_root": "", "send_email": "False"}
GONE_TIMEOUT = 60                # generous: what ends a process takes well under a second


def make_source(sandbox):
    rng = random.Random(30)
    return sandbox.single_source({f"part{i % 6}/file{i:02d}.bin": rng.randbytes(200_000)
                                  for i in range(60)})


def process_state(pid):
    """(name, state) of a process from /proc, or None once it has ended (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            head, tail = handle.read().rsplit(")", 1)
    except OSError:
        return None
    state = tail.split()[0]
    return None if state == "Z" else (head.split("(", 1)[1], state)


def stopped(pid):
    return (process_state(pid) or ("", "gone"))[1] == "T"


def named(sandbox, name):
    """The sandbox's processes with this name (its runs' processes: see Sandbox.processes)."""
    return [pid for pid in sandbox.processes() if (process_state(pid) or ("",))[0] == name]


def command_line(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().split(b"\0")
    except OSError:
        return []


def child_pass(sandbox):
    (pid,) = [pid for pid in sandbox.processes()
              if aab.CHILD_AGENT.encode() in command_line(pid)]
    return pid


def describe(sandbox):
    return {pid: process_state(pid) for pid in sandbox.processes()}


def backup_env(sandbox, endpoint_url=None, **extra):
    return sandbox.env(AWS_ENDPOINT_URL=endpoint_url or sandbox.endpoint_url,
                       AAM_VOLUME_SIZE=VOLUME_SIZE, **extra)


def start_backup(sandbox, env):
    return subprocess.Popen([sys.executable, PROGRAM] + sandbox.backup_args(changes=AWS_ONLY),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_throttled_backup(sandbox, proxy):
    """A backup whose 7-Zip the upload throttle has stopped (state T), uploads held."""
    proxy.delay_requests(HELD_SECONDS, kinds={"PutObject", "UploadPart"})
    backup = start_backup(sandbox, backup_env(sandbox, proxy.endpoint_url))
    wait_for(lambda: any(map(stopped, named(sandbox, "7zz"))) or backup.poll() is not None,
             120, "7-Zip was never stopped")
    assert backup.poll() is None, "the backup ended before the throttle stopped 7-Zip"
    return backup


def wait_until_stopped(pid):
    wait_for(lambda: stopped(pid), 30, f"process {pid} was not stopped")


def wait_until_nothing_left(sandbox):
    wait_for(lambda: not sandbox.processes(), GONE_TIMEOUT,
             lambda: f"processes of the killed run are left: {describe(sandbox)}")


def assert_next_run_restores_exactly(sandbox, tmp_path, mount):
    """The next backup succeeds, and a one-step restore of it gives the source back."""
    ok(sandbox.run(sandbox.backup_args(changes=AWS_ONLY), env=backup_env(sandbox)))
    destination = tmp_path / "restored"
    ok(sandbox.restore_chosen(aab.ONE_STEP_RESTORE, destination))
    assert snapshot(destination / "1") == snapshot(mount)


def log_text(sandbox):
    return "".join(open(path, encoding="utf-8").read() for path in sandbox.log_files())


@pytest.mark.parametrize("victims", [("parent",), ("child",), ("parent", "child")],
                         ids="+".join)
def test_a_backup_killed_while_7zip_is_stopped_leaves_no_process(sandbox, proxy, tmp_path,
                                                                 victims):
    mount = make_source(sandbox)
    backup = start_throttled_backup(sandbox, proxy)
    pids = {"parent": backup.pid, "child": child_pass(sandbox)}
    for victim in victims:
        os.kill(pids[victim], signal.SIGKILL)
    status = backup.wait(timeout=120)
    # parent: the child gets SIGTERM (Linux's parent-death signal) and ends its script;
    # child: the script group, stopped and orphaned, is continued with SIGHUP by the
    # kernel, and the parent ends whatever is left of it; both: the kernel does.
    wait_until_nothing_left(sandbox)
    assert status == (-signal.SIGKILL if "parent" in victims else aab.EXIT_FAILURE)
    assert_next_run_restores_exactly(sandbox, tmp_path, mount)


HANGING_7ZIP = "#!/bin/sh\n# 7-Zip stand-in: runs without end, writing nothing\nexec sleep 600\n"


def test_the_parent_ends_the_script_its_killed_child_left_running(sandbox, tmp_path):
    """A script still running (not stopped) when the child dies is not the kernel's
    business: the parent ends it, by the group the child recorded."""
    make_source(sandbox)
    stand_in = tmp_path / "7zz-hangs"
    stand_in.write_text(HANGING_7ZIP)
    stand_in.chmod(0o755)
    backup = start_backup(sandbox, backup_env(sandbox, AAM_7ZIP=str(stand_in)))
    wait_for(lambda: named(sandbox, "sleep") or backup.poll() is not None, 120,
             "the 7-Zip stand-in never ran")
    (sleeper,) = named(sandbox, "sleep")
    os.kill(child_pass(sandbox), signal.SIGKILL)
    assert backup.wait(timeout=120) == aab.EXIT_FAILURE
    assert sandbox.processes() == []          # ended before the parent exited
    assert "Ended what the child pass had left running: " in log_text(sandbox)
    assert f"sleep (pid {sleeper})" in log_text(sandbox)


def test_the_next_run_ends_exactly_what_an_earlier_run_left_stopped(sandbox, proxy,
                                                                    tmp_path):
    mount = make_source(sandbox)
    # Not of any run, named as the run's 7-Zip is, and stopped too: to be left alone.
    decoy_program = tmp_path / "7zz"
    shutil.copy(shutil.which("sleep"), decoy_program)
    decoy = subprocess.Popen([str(decoy_program), "600"], start_new_session=True)
    try:
        os.kill(decoy.pid, signal.SIGSTOP)
        wait_until_stopped(decoy.pid)
        backup = start_throttled_backup(sandbox, proxy)
        # The child stopped can no longer end its script; with the parent killed, nothing
        # of the run is left to end anything: the child, its shell and its 7-Zip stay
        # stopped (the child's death signal, SIGTERM, waits until it is continued).
        child = child_pass(sandbox)
        os.kill(child, signal.SIGSTOP)
        wait_until_stopped(child)
        backup.kill()
        backup.wait()
        left = {pid: process_state(pid) for pid in sandbox.processes()}
        assert sorted(name for name, _state in left.values()) == sorted(
            ["7zz", "sh", process_state(child)[0]])
        assert all(state == "T" for _name, state in left.values()), left
        # A pid the killed run recorded, now another process's (reused): left alone.
        (work_dir,) = [entry.path for entry in os.scandir(sandbox.temp) if entry.is_dir()]
        with open(os.path.join(work_dir, aab.PROCESS_GROUPS), "a", encoding="utf-8") as out:
            out.write(f"{decoy.pid} {aab.PosixPlatform().process_start(os.getpid())}\n")

        assert_next_run_restores_exactly(sandbox, tmp_path, mount)

        assert sandbox.processes() == []
        ended = [line for line in log_text(sandbox).splitlines()
                 if "Ended what an interrupted run had left running" in line]
        assert len(ended) == 1, ended
        for pid, (name, _state) in left.items():
            assert f"{name} (pid {pid}, stopped)" in ended[0]
        assert str(decoy.pid) not in ended[0]
        assert process_state(decoy.pid) == ("7zz", "T")
    finally:
        decoy.kill()
        decoy.wait()


SIGTERM_INSIDE_DONE_SET = r'''
import os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import aam_auto_backup as aab


class SignalledInsideSet(threading.Event):
    """The SIGTERM arrives while this thread holds the event's lock, inside set()."""

    def set(self):
        with self._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            self._flag = True
            self._cond.notify_all()


made = []
plain_event = threading.Event


def event():
    """The first event made from here on is the run's own (run_script's); the threads'
    internal ones stay plain."""
    made.append(plain_event() if made else SignalledInsideSet())
    return made[-1]


threading.Event = event
sys.exit(aab.run_script(["sh", "-c", "echo the script ran"], dict(os.environ), print,
                        aab.PosixPlatform(), sys.argv[2], os.getppid()))
'''


def test_a_sigterm_inside_the_child_passs_own_steps_ends_it_and_hangs_nothing(tmp_path):
    """A signal handler runs between two steps of the child's main thread, perhaps while
    that thread holds a lock (here the run's event, as it ends the script): the handler
    takes no lock, so the child ends (exit 130) instead of hanging for good, as it once
    did with every thread waiting in futex."""
    script = tmp_path / "signalled.py"
    script.write_text(SIGTERM_INSIDE_DONE_SET)
    # the timeout only keeps a regression from hanging the suite: the run takes < 1 s
    result = subprocess.run([sys.executable, str(script), aab.__file__.rsplit(os.sep, 1)[0],
                             str(tmp_path)], capture_output=True, text=True,
                            timeout=GONE_TIMEOUT)
    assert "the script ran" in result.stdout
    assert result.returncode == aab.EXIT_INTERRUPTED, result.stdout + result.stderr
