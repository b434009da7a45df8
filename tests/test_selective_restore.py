"""Selective restore: chosen paths only, thawing and downloading only the volumes that
hold them (small volumes through AAM_VOLUME_SIZE)."""

import os
import random
import re

import aam_auto_backup as aab
from conftest import file_times_pass, ok, snapshot, write_file

ONE_STEP = aab.ONE_STEP_RESTORE
MULTI_STEP = [aab.THAW_STEP, aab.STATUS_STEP, aab.DOWNLOAD_STEP, aab.EXTRACT_STEP]
VOLUME = 65536


def noise(stream, size):
    return random.Random(stream).randbytes(size)


def tree():
    """About 700 KB of incompressible files: the full backup spans over ten volumes."""
    files = {f"albums/{a}/photo-{n}.jpg": noise(int(a) * 10 + n, 40_000)
             for a in ("2023", "2024") for n in range(6)}
    files.update({f"letters/letter-{n}.txt": noise(100 + n, 30_000) for n in range(6)})
    files["letters/small.txt"] = b"the one small file\n"
    return files


def env(sandbox):
    return sandbox.restore_env(AAM_VOLUME_SIZE=str(VOLUME))


def backed_up(sandbox):
    mount = sandbox.single_source(tree())
    ok(sandbox.backup({"send_email": "False"}, env=env(sandbox)))
    return mount


def restore_selection(sandbox, operation, destination, selection, point="latest"):
    return sandbox.restore_chosen(operation, destination, point, selection, env(sandbox))


def thawed_during(proxy, run):
    proxy.reset_counters()
    result = run()
    return result, [r["key"] for r in proxy.requests() if r["kind"] == "RestoreObject"]


def planned_volumes(stdout):
    return re.findall(r"^  (\S+\.zip\.\d{3})  \([\d,]+ bytes\)$", stdout, re.M)


def full_volumes(sandbox):
    return [n for n in sandbox.object_names() if n.volume and n.incremental is None]


def test_one_small_file_thaws_at_most_two_volumes_of_the_full_backup(
        sandbox, proxy, tmp_path):
    mount = backed_up(sandbox)
    assert len(full_volumes(sandbox)) >= 6
    sandbox.endpoint_url = proxy.endpoint_url
    destination = tmp_path / "r"
    small = os.path.join(mount, "letters", "small.txt")
    result, thawed = thawed_during(proxy, lambda: restore_selection(
        sandbox, ONE_STEP, destination, [small]))
    ok(result)
    planned = planned_volumes(result.stdout)
    assert sorted(thawed) == sorted(planned)             # only what the plan names
    assert 1 <= len(planned) <= 2
    with open(small, "rb") as handle:
        assert open(destination / "1" / "letters" / "small.txt", "rb").read() == handle.read()
    assert sorted(snapshot(destination / "1")) == ["letters", "letters/small.txt"]
    assert re.search(r"^  selection +1 +19 +[12] ", result.stdout, re.M)
    assert re.search(r"^  whole set +19 ", result.stdout, re.M)
    restore_map = open(destination / "restore-map.txt", encoding="utf-8").read()
    assert f"PARTIAL, only what these match: {small}" in restore_map


def test_a_directory_across_volumes_restores_exactly_that_directory(
        sandbox, proxy, tmp_path):
    mount = backed_up(sandbox)
    sandbox.endpoint_url = proxy.endpoint_url
    destination = tmp_path / "r"
    result, thawed = thawed_during(proxy, lambda: restore_selection(
        sandbox, ONE_STEP, destination, [os.path.join(mount, "albums", "2024") + "/"]))
    ok(result)
    expected = {rel: item for rel, item in snapshot(mount).items()
                if rel.startswith("albums/2024")}
    got = snapshot(destination / "1")
    assert {k: v for k, v in got.items() if k != "albums"} == expected
    assert 2 < len(thawed) < len(full_volumes(sandbox))


def test_a_name_pattern_restores_every_match_from_where_it_was_last_changed(
        sandbox, proxy, tmp_path):
    mount = backed_up(sandbox)
    file_times_pass()
    letter = os.path.join(mount, "letters", "letter-3.txt")
    write_file(letter, b"rewritten after the full backup\n")
    ok(sandbox.backup({"send_email": "False"}, env=env(sandbox)))
    full_stamp, incremental_stamp = sandbox.backup_stamps()
    incremental_volumes = [n.key for n in sandbox.object_names()
                           if n.volume and n.incremental is not None]

    sandbox.endpoint_url = proxy.endpoint_url
    latest, thawed = thawed_during(proxy, lambda: restore_selection(
        sandbox, ONE_STEP, tmp_path / "latest", ["letter-3.txt"]))
    ok(latest)
    assert thawed == incremental_volumes                 # from the incremental only
    assert open(tmp_path / "latest" / "1" / "letters" / "letter-3.txt", "rb").read() \
        == b"rewritten after the full backup\n"

    earlier, thawed = thawed_during(proxy, lambda: restore_selection(
        sandbox, ONE_STEP, tmp_path / "earlier", ["letter-3.txt"], point=full_stamp))
    ok(earlier)
    assert thawed and not set(thawed) & set(incremental_volumes)
    assert open(tmp_path / "earlier" / "1" / "letters" / "letter-3.txt", "rb").read() \
        == tree()["letters/letter-3.txt"]


def test_a_selection_that_matches_nothing_says_so_and_thaws_nothing(
        sandbox, proxy, tmp_path):
    mount = backed_up(sandbox)
    sandbox.endpoint_url = proxy.endpoint_url
    result, thawed = thawed_during(proxy, lambda: restore_selection(
        sandbox, ONE_STEP, tmp_path / "r", [os.path.join(mount, "no-such-dir") + "/",
                                             "*.docx"]))
    assert result.returncode == aab.EXIT_NOTHING_SELECTED, result.stdout + result.stderr
    assert re.search(r"Nothing in the backup as of .* matches the selection \(.*no-such-dir/ "
                     r"\| \*\.docx\); nothing was thawed\.", result.stdout)
    assert thawed == []


def test_the_multi_step_operations_with_a_selection_give_what_one_step_gives(
        sandbox, tmp_path):
    mount = backed_up(sandbox)
    selection = [os.path.join(mount, "letters") + "/", "photo-1.jpg"]
    ok(restore_selection(sandbox, ONE_STEP, tmp_path / "one", selection))
    for operation in MULTI_STEP:
        ok(restore_selection(sandbox, operation, tmp_path / "steps", selection))
    assert snapshot(tmp_path / "steps" / "1") == snapshot(tmp_path / "one" / "1")
    assert "albums/2023/photo-1.jpg" in snapshot(tmp_path / "one" / "1")
    assert "albums/2023/photo-2.jpg" not in snapshot(tmp_path / "one" / "1")


def test_a_wider_selection_later_uses_what_was_downloaded(sandbox, proxy, tmp_path):
    mount = backed_up(sandbox)
    destination = tmp_path / "r"
    ok(restore_selection(sandbox, ONE_STEP, destination, [os.path.join(mount, "letters") + "/"]))
    sandbox.endpoint_url = proxy.endpoint_url
    proxy.reset_counters()
    wider = ok(restore_selection(sandbox, ONE_STEP, destination,
                                 [os.path.join(mount, "letters") + "/", "photo-0.jpg"]))
    assert "The selection differs" in wider.stdout
    got = snapshot(destination / "1")
    assert "letters/small.txt" in got and "albums/2024/photo-0.jpg" in got
    downloaded = [r["key"] for r in proxy.requests() if r["kind"] == "GetObject"]
    first_time = planned_volumes(wider.stdout)
    assert len(downloaded) < len(first_time)             # the letters' volumes are kept


def test_a_selection_makes_only_the_numbered_directories_it_fills(sandbox, tmp_path):
    tree = sandbox.sample()
    ok(sandbox.backup({"send_email": "False"}))
    first, second = tree.first_mount, tree.second_mount
    destination = tmp_path / "r"
    ok(sandbox.restore_chosen(ONE_STEP, destination,
                              selection=[os.path.join(first, "Documents", "report.txt")]))
    assert sorted(n for n in os.listdir(destination) if not n.startswith(".")) == \
        ["1", "downloads", "restore-map.txt"]
    lines = open(destination / "restore-map.txt", encoding="utf-8").read().splitlines()
    assert f"1\t{first}\trestored" in lines
    assert f"2\t{second}\tnothing selected (no directory)" in lines

    # another selection in the same destination: the directory it leaves out goes
    result = ok(sandbox.restore_chosen(ONE_STEP, destination,
                                       selection=[os.path.join(second, "docs") + "/"]))
    assert f"Nothing of {first} is selected: no directory {destination / '1'}" \
        in result.stdout
    assert not (destination / "1").exists()
    assert sorted(snapshot(destination / "2")) == ["docs", "docs/readme.md"]
    assert open(destination / "2" / "docs" / "readme.md", "rb").read() == b"second source\n"
    lines = open(destination / "restore-map.txt", encoding="utf-8").read().splitlines()
    assert f"1\t{first}\tnothing selected (no directory)" in lines
    assert f"2\t{second}\trestored" in lines
