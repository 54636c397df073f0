"""Checks of a command's inputs, run before Ray starts: a mistyped path fails
in a second with a message that says what is wrong, not 15 s later in a Ray
task.

Plain fsspec (no Ray). Each check returns the URL to use: a table's output
root may be given as the root or as the table's own folder, and both lead to
the same place.
"""

from __future__ import annotations

import posixpath

import fsspec

from dynamix_ray.io import MADE_BY, POINTER, current_version, resolve, url_of
from dynamix_ray.schema import SOURCES

__all__ = [
    "InputError",
    "check_checkpoint",
    "check_events",
    "check_events_or_stream",
    "check_table",
]


class InputError(FileNotFoundError):
    """An input is missing or is not what the command reads."""


def _exists(url: str, what: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = resolve(url)
    if not fs.exists(root):
        raise InputError(f"{url}: no such folder (expected {what})")
    if not fs.isdir(root):
        raise InputError(f"{url}: a file, not a folder (expected {what})")
    return fs, root


def check_events(url: str) -> str:
    """``url`` if it is an event dataset root (docs/contract.md §1) or an
    event store: it holds ``ad_impressions/``."""
    fs, root = _exists(url, "an event dataset root")
    if fs.exists(f"{root}/ad_impressions"):
        return url
    name = posixpath.basename(root.rstrip("/"))
    if name in SOURCES:
        raise InputError(
            f"{url}: this is the {name}/ folder itself; pass the dataset root "
            f"that holds it ({url_of(fs, posixpath.dirname(root))})"
        )
    raise InputError(
        f"{url}: no ad_impressions/ in it: expected an event dataset root "
        "(docs/contract.md §1) or an event store (`dynamix bucket`)"
    )


def check_events_or_stream(url: str) -> str:
    """``url`` if it is a Redis stream URL (``redis://...?stream=KEY``: checked
    when it is read) or passes :func:`check_events`."""
    from dynamix_ray.online import is_redis_url, redact, stream_of

    if is_redis_url(url):
        if stream_of(url) is None:
            raise InputError(
                f"{redact(url)}: a Redis URL as EVENTS must name a stream (?stream=KEY)"
            )
        return url
    return check_events(url)


def check_table(url: str, part: str) -> str:
    """The output root of a published ``part`` table: ``url`` itself when it
    holds ``part/_CURRENT.json``, its parent when ``url`` is the ``part``
    folder (either may be passed). The pointer is read as every reader reads
    it (``io.current_version``)."""
    made_by = MADE_BY.get(part, "dynamix")
    fs, root = _exists(url, f"the output of `{made_by}`")
    if current_version(fs, root, part) is not None:
        return url
    parent = posixpath.dirname(root.rstrip("/"))
    if (
        posixpath.basename(root.rstrip("/")) == part
        and current_version(fs, parent, part) is not None
    ):
        return url_of(fs, parent)
    raise InputError(
        f"{url}: no published {part} table in it (no {part}/{POINTER}); "
        f"expected the output folder of `{made_by}`"
    )


def check_checkpoint(url: str) -> str:
    """``url`` if it is a checkpoint folder or a ``dynamix train`` OUT."""
    from dynamix_ray.model.checkpoint import resolve_checkpoint

    _exists(url, "a checkpoint or a `dynamix train` output folder")
    try:
        resolve_checkpoint(url)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None
    return url
