"""Windows under Wine for the tests: Windows Python 3.11 and 7z.exe for real.

`tools/setup.sh --wine` installs Wine and the Windows parts into a cache and
names it in .venv/wine-parts.  A test session copies the cached Wine prefix
(made once by wineboot) into its own directory, so sessions on one machine never
share drive letters or a wineserver, and lays out a program directory as the
Windows walkthrough (docs/scheduling.md) does: aam_auto_backup.py, 7z.exe,
7z.dll and a ShadowSpawn.exe stand-in (tests/windows_stand_ins/shadowspawn.py says what it
emulates).  Wine runs headless (no DISPLAY) and quiet (WINEDEBUG=-all).

The Windows Python starts only when its standard output and error are pipes (or
NUL), not regular files: run it with capture_output.
"""

import importlib.util
import io
import os
import shutil
import subprocess
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_INS = os.path.join(REPO, "tests", "windows_stand_ins")
PARTS_FILE = os.path.join(REPO, ".venv", "wine-parts")
SETUP_HINT = "run tools/setup.sh --wine"


def missing_parts():
    """None when Wine and every Windows part is installed, else what is missing."""
    if not shutil.which("wine"):
        return f"Wine is not installed ({SETUP_HINT})"
    if not os.path.isfile(PARTS_FILE):
        return f"the Windows parts are not installed: no {PARTS_FILE} ({SETUP_HINT})"
    parts = open(PARTS_FILE, encoding="utf-8").read().strip()
    for part in ("python/python.exe", "7zip/7z.exe", "7zip/7z.dll", "prefix/system.reg"):
        if not os.path.isfile(os.path.join(parts, part)):
            return f"{os.path.join(parts, part)} is missing ({SETUP_HINT})"
    return None


def windows_path(path):
    """A Linux path as Wine's Z: drive shows it."""
    return "Z:" + os.path.abspath(path).replace("/", "\\")


def launcher_exe(script, python_exe):
    """An .exe that runs script with python_exe, passing its command line on.

    distlib's console launcher (the one pip puts in front of Windows entry
    points) runs '<python> <this .exe> <its arguments as written>', and Python
    runs the zip appended to the .exe as a program.
    """
    spec = importlib.util.find_spec("pip._vendor.distlib")
    launcher = os.path.join(spec.submodule_search_locations[0], "t64.exe")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.write(script, "__main__.py")
    with open(launcher, "rb") as handle:
        head = handle.read()
    return head + f'#!"{python_exe}"\n'.encode() + archive.getvalue()


class Wine:
    """One Wine prefix and one Windows program directory for a test session."""

    def __init__(self, root):
        self.parts = open(PARTS_FILE, encoding="utf-8").read().strip()
        self.root = root
        self.prefix = os.path.join(root, "prefix")
        shutil.copytree(os.path.join(self.parts, "prefix"), self.prefix, symlinks=True)
        self.python_exe = windows_path(os.path.join(self.parts, "python", "python.exe"))
        self.program_dir = os.path.join(root, "program")
        self.program = windows_path(os.path.join(self.program_dir, "aam_auto_backup.py"))
        self.lay_out_program_dir()
        # One wineserver for the whole session (it would stop 3 s after each program).
        subprocess.run(["wineserver", "-p"], env=self.env(), check=True)
        cmd_stand_in = os.path.join(root, "cmd-for-wine.exe")
        self.write_exe(cmd_stand_in, "cmd_for_wine.py")
        # The child runs its batch file with %ComSpec%: the cmd.exe stand-in (its
        # docstring says why).  This first program also starts Wine's services, which
        # keep the standard handles they inherit: those must not be a test's pipes.
        environment = r"HKLM\System\CurrentControlSet\Control\Session Manager\Environment"
        subprocess.run(["wine", "reg", "add", environment, "/v", "ComSpec", "/d",
                        windows_path(cmd_stand_in), "/f"],
                       env=self.env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True, timeout=120)

    def lay_out_program_dir(self):
        os.makedirs(self.program_dir)
        shutil.copy(os.path.join(REPO, "aam_auto_backup.py"), self.program_dir)
        for name in ("7z.exe", "7z.dll"):
            shutil.copy(os.path.join(self.parts, "7zip", name), self.program_dir)
        self.write_exe(os.path.join(self.program_dir, "ShadowSpawn.exe"), "shadowspawn.py")

    def write_exe(self, path, stand_in):
        with open(path, "wb") as handle:
            handle.write(launcher_exe(os.path.join(STAND_INS, stand_in), self.python_exe))

    def env(self, base=None):
        env = dict(os.environ if base is None else base)
        env.pop("DISPLAY", None)
        env.update(WINEPREFIX=self.prefix, WINEDEBUG="-all",
                   WINEDLLOVERRIDES="mscoree,mshtml=")
        return env

    def map_drive(self, letter, directory):
        """Drive letter -> Linux directory, through $WINEPREFIX/dosdevices."""
        link = os.path.join(self.prefix, "dosdevices", letter.lower() + ":")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(directory), link)

    def python(self, *args):
        """argv of the Windows Python."""
        return ["wine", self.python_exe, *args]

    def run(self, argv, env=None, timeout=300, **popen):
        return subprocess.run(argv, env=self.env(env), capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, **popen)

    def close(self):
        subprocess.run(["wineserver", "-k"], env=self.env(), capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
