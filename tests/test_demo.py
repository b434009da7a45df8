"""The README's demo command works: full, incremental, restore against a local endpoint."""

import os
import subprocess
import sys

from conftest import REPO


def test_the_demo_backs_up_twice_and_restores(tmp_path):
    output = tmp_path / "demo"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "demo.py"),
                             "--output", str(output)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    text = result.stdout
    assert "Backup scope: full" in text and "Backup scope: incremental" in text
    assert "DEEP_ARCHIVE" in text and "_0_0.0_yes_" in text
    assert "Subject: SUCCESS," in text and "data restoration!" in text
    restored = output / "restored"
    assert (restored / "restore-map.txt").exists()
    report = next(restored.glob("*/home/ann/Documents/report.txt"), None) or next(
        restored.glob("**/report.txt"))
    assert report.read_text().endswith("an edit after the full backup\n")
    assert "demo key" not in text        # the key is passed as env:NAME, never shown
