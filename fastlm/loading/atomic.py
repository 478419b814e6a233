"""Saves that never leave half a file: a directory replaced whole (replace_dir), or files staged and moved into a
directory one by one (staged_files)."""
import contextlib
import os
import shutil
import tempfile


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


@contextlib.contextmanager
def staged_files(directory: str, last: tuple = ()):
    """Yield a staging directory inside `directory` (created if missing) to write files into. When the block ends
    without an exception, each file is moved into `directory` with os.replace, one by one, those named in `last`
    after the others; the staging directory is removed either way. So a save that fails leaves the files of an
    earlier one whole, and files of `directory` that the save does not write are not touched."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fastlm-staging-", dir=directory)
    try:
        yield staging
        for name in sorted(os.listdir(staging), key=lambda name: name in last):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
