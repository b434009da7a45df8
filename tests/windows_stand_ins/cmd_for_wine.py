"""cmd.exe stand-in for the Wine tests: Wine's own cmd.exe, with two Wine bugs avoided.

Wine 8.0's cmd.exe differs from Windows' in two constructs of the batch file that
AAM Auto Backup's child writes: it runs the right side of '||' even after success
(so 'cd /D q:\\ || goto end' always jumps to the end), and 'echo(' prints the
parenthesis (so the key fed to 7z.exe would start with '(').  The Wine tests make
this stand-in the prefix's ComSpec.  Given '/c' and a batch file, it writes a copy
in which exactly those constructs are replaced by their Wine equivalents ('cd' with
no '|| goto end', 'echo.' for 'echo(', Wine's cmd.exe for the key feed's
"%ComSpec%") and runs the copy with Wine's cmd.exe and the same switches.
Everything else runs as written: chcp, the pipe, delayed expansion of the key,
7z.exe and its list files, errorlevel.  What Windows' cmd.exe reads in the batch
file is pinned by tests/test_windows_commands.py, not by this.

tests/wine.py builds the stand-in .exe from this file and distlib's launcher.
"""

import ctypes
import subprocess
import sys

WINE_CMD = "C:\\windows\\system32\\cmd.exe"
REWRITES = [(b" || goto end\r\n", b"\r\n"), (b'"%ComSpec%"', b'"' + WINE_CMD.encode() + b'"'),
            (b"echo(", b"echo.")]

kernel32 = ctypes.windll.kernel32
kernel32.GetCommandLineW.restype = ctypes.c_wchar_p


def main():
    # Our own command line without the launcher's two words (python.exe, this .exe).
    line = kernel32.GetCommandLineW()
    for _ in range(2):
        line = line.lstrip()
        end = line.index('"', 1) + 1 if line.startswith('"') else line.find(" ")
        line = line[end:]
    switches, _, target = line.partition("/c ")
    batch = target.strip().strip('"')       # /s /c ""file"": all the quotes go
    if not batch.lower().endswith(".bat"):
        return subprocess.run(f'"{WINE_CMD}" {line}').returncode
    with open(batch, "rb") as handle:
        text = handle.read()
    for old, new in REWRITES:
        text = text.replace(old, new)
    copy = batch[:-4] + ".wine.bat"
    with open(copy, "wb") as handle:
        handle.write(text)
    return subprocess.run(f'"{WINE_CMD}" {switches}/c ""{copy}""').returncode


if __name__ == "__main__":
    sys.exit(main())
