"""ShadowSpawn.exe stand-in for the Wine tests: NOT ShadowSpawn.

ShadowSpawn makes a Volume Shadow Copy (VSS) snapshot, shows it at a drive letter
and runs a command there.  Wine has no VSS, so this stand-in emulates only what
AAM Auto Backup relies on, and says so on its first output line:

- it splits its command line as ShadowSpawn does: words separated by blanks, a
  double-quoted part may hold blanks, the quotes stay in the word, a backslash is
  an ordinary character; an unquoted word starting with '-' is one of its own
  switches, and this stand-in knows none, so it stops (exit 1) as ShadowSpawn
  stops on a switch it does not know;
- it shows the source directory (the live one: no snapshot) at the drive letter,
  through Wine's mount manager, as `winecfg` maps a drive; the letter must be free;
- it runs the words after the drive letter, exactly as written, as the command
  line of a new process that inherits its standard handles, waits for it, removes
  the drive letter and exits with the command's exit code;
- its own lines are in the console (OEM) code page, like a console program's.

For the lock tests, SHADOWSPAWN_STAND_IN_GATE names a file the stand-in waits
for (up to 2 minutes) before it runs the command: a snapshot that takes long.

tests/wine.py builds ShadowSpawn.exe from this file and distlib's launcher.
"""

import ctypes
import os
import struct
import subprocess
import sys
import time
from ctypes import wintypes

# Wine's mount manager (include/ddk/mountmgr.h, IOCTL_MOUNTMGR_DEFINE_UNIX_DRIVE).
DEFINE_UNIX_DRIVE = (ord("m") << 16) | (3 << 14) | (32 << 2)
DRIVE_NO_ROOT_DIR, DRIVE_FIXED = 1, 3
kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
kernel32.CreateFileW.restype = wintypes.HANDLE
kernel32.CreateFileW.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD,
                                 ctypes.c_void_p, wintypes.DWORD, wintypes.DWORD,
                                 wintypes.HANDLE]
kernel32.DeviceIoControl.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.c_void_p,
                                     wintypes.DWORD, ctypes.c_void_p, wintypes.DWORD,
                                     ctypes.POINTER(wintypes.DWORD), ctypes.c_void_p]
kernel32.GetCommandLineW.restype = wintypes.LPCWSTR
kernel32.wine_get_unix_file_name.restype = ctypes.c_char_p
kernel32.wine_get_unix_file_name.argtypes = [wintypes.LPCWSTR]


def say(text):
    """A line in the OEM code page (a console program's narrow output)."""
    sys.stdout.buffer.write((text + "\r\n").encode(f"cp{kernel32.GetOEMCP()}", "replace"))
    sys.stdout.flush()


def split_words(command_line):
    """ShadowSpawn's splitting: blanks separate words, quotes group and are kept."""
    words, word, quoted = [], "", False
    for char in command_line:
        if char == '"':
            quoted = not quoted
        elif char in " \t" and not quoted:
            if word:
                words.append(word)
            word = ""
            continue
        word += char
    return words + ([word] if word else [])


def own_words():
    """Our command line without the launcher's two words (python.exe, this .exe)."""
    return split_words(kernel32.GetCommandLineW())[2:]


def define_drive(letter, unix_path, drive_type):
    manager = kernel32.CreateFileW("\\\\.\\MountPointManager", 0xC0000000, 3, None, 3, 0,
                                   None)
    path = unix_path + b"\0" if unix_path else b""
    request = bytearray(struct.pack("<IIIIQHHHH", 0, drive_type, 0, 0, 0, ord(letter),
                                    32 if path else 0, 0, 0) + path)
    struct.pack_into("<I", request, 0, len(request))
    buffer = ctypes.create_string_buffer(bytes(request))
    done = wintypes.DWORD()
    ok = kernel32.DeviceIoControl(manager, DEFINE_UNIX_DRIVE, buffer, len(request), None, 0,
                                  ctypes.byref(done), None)
    kernel32.CloseHandle(manager)
    if not ok:
        raise OSError(f"the mount manager refused drive {letter}: "
                      f"error {ctypes.get_last_error()}")


def main():
    words = own_words()
    say("ShadowSpawn stand-in for the Wine tests (no VSS snapshot: the live directory)")
    switches = [w for w in words[:3] if w.startswith("-")]
    if len(words) < 3 or switches:
        say(f"Unknown switch or missing arguments: {' '.join(switches) or words}")
        return 1
    source, drive = words[0].strip('"'), words[1].strip('"')
    letter = drive.rstrip(":").lower()
    if os.path.exists(letter + ":\\"):
        say(f"Drive {letter}: is in use")
        return 1
    gate = os.environ.get("SHADOWSPAWN_STAND_IN_GATE")
    if gate:
        say(f"Waiting for {gate}")
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.2)
    define_drive(letter, kernel32.wine_get_unix_file_name(source), DRIVE_FIXED)
    say(f"Shadowing {source} at {letter}:")
    try:
        return subprocess.run(" ".join(words[2:])).returncode
    finally:
        define_drive(letter, None, DRIVE_NO_ROOT_DIR)


if __name__ == "__main__":
    sys.exit(main())
