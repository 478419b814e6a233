"""Atomic replacement of a directory: readers see the old one or the new one, never half of either."""
import os
import shutil


def replace_dir(staging: str, target: str) -> None:
    """Move the complete directory `staging` to `target`, replacing any earlier `target`.

    `staging` must be on the same filesystem as `target` (create it beside `target`). The old target is
    renamed aside first and deleted only after the new one is in place.
    """
    old = None
    if os.path.exists(target):
        old = f"{target}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(staging, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
