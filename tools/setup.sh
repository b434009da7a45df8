#!/usr/bin/env bash
# Install what AAM Auto Backup, its tests and its demo need (Debian/Ubuntu).
# Idempotent: apt packages only when a tool is missing, a venv in .venv.
# Usage: tools/setup.sh [--bench]   (--bench adds restic and duplicity)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

packages=()
command -v 7zz >/dev/null 2>&1 || packages+=(7zip)
command -v rsync >/dev/null 2>&1 || packages+=(rsync)
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)
if [ "${1:-}" = "--bench" ]; then
    command -v restic >/dev/null 2>&1 || packages+=(restic)
    command -v duplicity >/dev/null 2>&1 || packages+=(duplicity)
    # duplicity's boto3+s3:// backend imports boto3 in the system Python.
    /usr/bin/python3 -c 'import boto3' >/dev/null 2>&1 || packages+=(python3-boto3)
fi
if [ ${#packages[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing Debian packages: ${packages[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if [ ! -x "$repo/.venv/bin/python" ]; then
    python3 -m venv "$repo/.venv"
fi
"$repo/.venv/bin/python" -m pip install -q --disable-pip-version-check \
    -r "$repo/requirements.txt" -r "$repo/tests/requirements.txt"
