"""argparse types shared by the tools (bench, local_aws, the scheduling helpers)."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aam_auto_backup as aab  # noqa: E402


def rate(text):
    """Bytes per second, read as the program reads AAM_UPLOAD_LIMIT (20Mbit, 2.5M, ...)."""
    try:
        return aab.parse_byte_rate(text)
    except ValueError as problem:
        raise argparse.ArgumentTypeError(str(problem))


def hours_as_minutes(text):
    """A number of hours (6, 6.5) as whole minutes, from one minute to a week."""
    try:
        minutes = round(float(text) * 60)
    except ValueError:
        minutes = 0
    if not 1 <= minutes <= 7 * 24 * 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours from 1/60 to "
                                         "168")
    return minutes
