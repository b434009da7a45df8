"""Asking the user for a secret: never echoed, typed twice, the same both times."""

import getpass

ATTEMPTS = 3


def ask_twice(prompt, attempts=ATTEMPTS, warn=print):
    """The secret typed the same way twice (getpass never echoes it); a ValueError after
    attempts tries.  warn(text) says why a try was not taken."""
    for _attempt in range(attempts):
        first = getpass.getpass(f"{prompt}: ")
        if not first:
            warn("It is empty; once more.")
        elif getpass.getpass(f"{prompt}, again: ") != first:
            warn("The two differ; once more.")
        else:
            return first
    raise ValueError(f"{prompt}: not typed the same way twice in {attempts} tries")
