"""Corpus paths on any storage -> the files to read, resolved on the driver.

A corpus is files, folders (read recursively), globs or a comma list of those, each a local
path or a URI that ``sentdisc.storage`` opens (``file://``, ``s3://``, ``gs://``...). Listing
goes through storage's pyarrow filesystems, the ones the read tasks use, and happens here, on
the driver, before any Ray task: a typo, a missing bucket, missing credentials or an endpoint
that does not answer is one ``DataError`` / ``StorageError`` line naming the path.
Names starting with '_' or '.' inside folders are bookkeeping (``_SUCCESS``, a manifest,
``.crc``) and skipped. The default corpus (``$SENTDISC_DATA/amazon_blitzer/reviews``, what
jobs/configs/local.yaml reads) is fetched when it is absent (``data.fetch.fetch_default_corpus``).
"""
from __future__ import annotations

import os
import re

import pyarrow.fs as pafs

from sentdisc import storage
from sentdisc.data.config import DataError
from sentdisc.data.fetch import fetch_default_corpus

_MAGIC = re.compile(r"[*?[]")


def list_corpus(spec: str | list[str]) -> list[tuple[str, int]]:
    """Files, folders, globs or a comma list -> sorted, de-duplicated ``(uri, size)``.

    Local paths come back absolute, URIs as URIs. Raises naming the first entry that matches
    nothing or whose storage cannot be reached.
    """
    parts = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    parts = [str(p).strip() for p in parts if str(p).strip()]
    if not parts:
        raise DataError("no data path given")
    found: dict[str, int] = {}
    for part in parts:
        found.update(_expand(part))
    return sorted(found.items())


def resolve_paths(spec: str | list[str]) -> list[str]:
    """The file names of ``list_corpus(spec)``."""
    return [uri for uri, _ in list_corpus(spec)]


def _expand(part: str) -> list[tuple[str, int]]:
    if storage.is_uri(part):
        storage.check_access(part, "data")  # no credentials, no bucket, no endpoint: say so now
    else:
        part = storage.absolute(part)
    if _MAGIC.search(part):
        found = _glob(part)
        if not found:
            raise DataError(f"{part}: glob matches no files")
        return found
    if storage.is_file(part):
        fs, path = storage.filesystem(part)
        return [(part, fs.get_file_info(path).size)]
    found = storage.list_files(part) if storage.is_dir(part) else None
    if found:
        return found
    # The default corpus absent (a fresh machine): the sample is fetched into it. Only that
    # path: a missing path the user gave stays an error.
    if fetch_default_corpus(part):
        return storage.list_files(part)
    raise DataError(f"{part}: folder holds no data files" if found is not None
                    else f"{part}: no such file or folder")


def _glob(pattern: str) -> list[tuple[str, int]]:
    """Files matching a glob: ``*`` and ``?`` within a name, ``**`` across folders. The folder
    before the first wildcard is listed once, recursively, and the names are matched here,
    the same way on every storage."""
    base = pattern[: _MAGIC.search(pattern).start()].rsplit("/", 1)[0] or "/"
    regex = glob_regex(pattern)
    return [(uri, size) for uri, size in storage.list_files(base) if regex.match(uri)]


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regular expression over whole names ('/'-separated)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def corpus_root(uris: list[str]) -> str:
    """The deepest folder holding every file: names relative to it are the corpus's own
    (split keys, the ``file`` column of preprocessed shards), wherever the corpus lives."""
    parts = [u.rsplit("/", 1)[0].split("/") for u in uris]
    return "/".join(os.path.commonprefix(parts)) or "/"


def on_one_filesystem(uris: list[str]) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, URI prefix, paths inside it) for files that share one storage.

    ``prefix + path`` gives each URI back (prefix ``s3://``, ``file://``, or '' for local
    paths), so read tasks can name files as the user did without carrying a map of names.
    """
    fs, prefix, paths = None, "", []
    for uri in uris:
        this_fs, path = storage.filesystem(uri)
        if not uri.endswith(path):
            raise DataError(f"{uri}: cannot name this file inside its storage ({path})")
        this_prefix = uri[: len(uri) - len(path)]
        if fs is not None and (this_prefix, this_fs.type_name) != (prefix, fs.type_name):
            raise DataError(f"{uri}: a corpus is read from one storage, and {uris[0]} is on "
                            "another")
        fs, prefix = this_fs, this_prefix
        paths.append(path)
    return fs, prefix, paths
