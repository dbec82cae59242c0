"""``sentdisc data fetch NAME [--dest DIR]``: download a public dataset, verified, resumable.

The datasets are in ``sentdisc.data.registry`` (SST-2, the Amazon sample corpus, OpenAI's
weights), each written to the folder ``../shared/data`` has it in: ``DIR/sst2/``,
``DIR/amazon_blitzer/reviews/``, ``DIR/openai_weights/``. ``--dest`` defaults to
``sentdisc.config.default_data_dir()`` ($SENTDISC_DATA, else ../shared/data), where jobs and
``--load_model openai`` look. Each file:

- downloads into a hidden ``.NAME.part`` beside it (hidden so a corpus listing never reads a
  half file) and resumes from it with an HTTP Range request; a server that ignores Range
  sends the whole file, which replaces the part;
- shows progress on a line every few seconds (MB, MB/s, ETA) and one line when done;
- is verified (``registry.verify``: SHA-256 or git blob id, a ``.npy`` header's shape, or a
  content check for an unpinned file) before it takes its name; a mismatch deletes it and
  says which file, expected and got.

OpenAI's 15 files are then converted into ``DIR/openai_checkpoint`` (a sentdisc checkpoint;
``--no_convert`` skips it). An unreachable host fails within ``--timeout`` seconds naming the
URL. ``--base_url URL`` (or ``$SENTDISC_FETCH_BASE_URL``) fetches every file from
``URL/NAME/FILE`` instead: a mirror, or a test's local server; it must be an ``http://``,
``https://`` or ``file://`` URL, and a mirror that refuses or lacks a file is named as the
mirror (not as this machine being offline).
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Optional

from sentdisc.data.registry import (
    DEFAULT_CORPUS,
    REGISTRY,
    SAMPLE_CORPUS,
    Dataset,
    RemoteFile,
    VerifyError,
    verify,
)
from sentdisc.errors import InputError

BASE_URL_ENV = "SENTDISC_FETCH_BASE_URL"
TIMEOUT = 10.0       # seconds to connect and per read: an offline machine fails in seconds
PROGRESS_EVERY = 3.0  # seconds between progress lines: a line, not a flood
CHUNK = 1 << 20


class FetchError(InputError):
    """A download that failed or did not match its registry entry."""


def part_path(final: str | os.PathLike) -> str:
    final = Path(final)
    return str(final.with_name(f".{final.name}.part"))


def url_of(ds: Dataset, remote: RemoteFile, base_url: Optional[str] = None) -> str:
    base = mirror_of(base_url)
    return f"{base.rstrip('/')}/{ds.name}/{remote.name}" if base else remote.url


def mirror_of(base_url: Optional[str] = None) -> Optional[str]:
    """The mirror every file comes from (``base_url``, else $SENTDISC_FETCH_BASE_URL), checked
    to be an http(s):// or file:// URL; None for the registry's own URLs."""
    base = base_url or os.environ.get(BASE_URL_ENV)
    if not base:
        return None
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https", "file") or \
            (parts.scheme != "file" and not parts.netloc):
        given = "--base_url" if base_url else f"${BASE_URL_ENV}"
        raise FetchError(f"{given} {base!r} is not a URL: it must start with http://, https:// "
                         "or file://")
    return base


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not math.isfinite(timeout) or timeout <= 0:
        raise FetchError(f"--timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


# --- one file ------------------------------------------------------------------------------------

def download(remote: RemoteFile, folder: str, url: str, timeout: float = TIMEOUT,
             allow_unpinned: bool = False, log=print, mirror: Optional[str] = None
             ) -> tuple[str, bool]:
    """Fetch one file into ``folder`` and verify it: (its path, whether it was downloaded).
    ``mirror``: the --base_url ``url`` is under, named when it fails."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create {folder} ({e}): pass --dest a writable folder") from None
    final = os.path.join(folder, remote.name)
    if os.path.exists(final):
        try:
            log(f"  {remote.name}: present, {verify(remote, final, allow_unpinned)}")
            return final, False
        except VerifyError as e:
            log(f"  {final} is not the pinned file ({e}): downloading it again")
            os.remove(final)
    part = part_path(final)
    _transfer(url, part, remote.name, timeout, log, mirror)
    try:
        checked = verify(remote, part, allow_unpinned)
    except VerifyError as e:
        _remove(part)
        raise FetchError(f"{final} from {url}: {e}; the download was deleted") from None
    os.replace(part, final)
    log(f"  {remote.name}: {checked}")
    return final, True


def _transfer(url: str, part: str, name: str, timeout: float, log,
              mirror: Optional[str] = None) -> None:
    """Download ``url`` into ``part``, resuming from what ``part`` already holds."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is past the end (the remote changed): start over
            log(f"  {name}: the partial download does not fit the remote file: restarting")
            _remove(part)
            return _transfer(url, part, name, timeout, log, mirror)
        where = f" (the mirror {mirror} lacks it?)" if mirror and e.code == 404 else ""
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}{where}") from None
    except ValueError as e:  # urllib: "unknown url type" and the like
        raise FetchError(f"{url}: not a URL this command can fetch ({e})") from None
    except (urllib.error.URLError, OSError, HTTPException) as e:
        raise FetchError(_unreachable(url, e, timeout, mirror)) from None
    with resp:
        start, total = _resume_point(resp, have)
        if have and not start:
            log(f"  {name}: the server ignored the Range request: downloading it whole")
        elif start:
            log(f"  {name}: resuming at {start / 1e6:.1f} MB")
        _copy(resp, part, start, total, name, url, log)


def _resume_point(resp, have: int) -> tuple[int, Optional[int]]:
    """(offset the body starts at, total size or None): ``have`` for a 206 that continues the
    part, else 0 (a 200 is the whole file)."""
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        rng = resp.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
        try:
            first, size = rng.split()[1].split("-")[0], rng.split("/")[1]
            if int(first) == have:
                return have, None if size == "*" else int(size)
        except (IndexError, ValueError):
            pass
        raise FetchError(f"{resp.url}: a partial response that does not continue the "
                         f"download ({rng!r} for bytes={have}-)")
    return 0, int(length) if length and length.isdigit() else None


def _copy(resp, part: str, start: int, total: Optional[int], name: str, url: str, log) -> None:
    progress = Progress(name, start, total, log)
    done = start
    try:
        out = open(part, "ab" if start else "wb")
    except OSError as e:
        raise FetchError(f"cannot write {part} ({e}): pass --dest a writable folder") from None
    with out:
        try:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                progress.update(done)
        except (OSError, HTTPException) as e:
            raise FetchError(f"{url}: interrupted at {done / 1e6:.1f} MB ({e}); rerun to resume "
                             f"from {part}") from None
    if total is not None and done != total:
        raise FetchError(f"{url}: the connection closed at {done} of {total} bytes; rerun to "
                         f"resume from {part}")
    progress.finish(done)


class Progress:
    """Bytes, MB/s and ETA of one download, printed every PROGRESS_EVERY seconds."""

    def __init__(self, name: str, start: int, total: Optional[int], log, every=PROGRESS_EVERY):
        self.name, self.start, self.total, self.log, self.every = name, start, total, log, every
        self.t0 = self.last = time.monotonic()

    def rate(self, done: int) -> float:
        return (done - self.start) / max(time.monotonic() - self.t0, 1e-6) / 1e6

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = self.rate(done)
        line = f"  {self.name}: {done / 1e6:.1f}"
        if self.total:
            eta = (self.total - done) / 1e6 / max(rate, 1e-9)
            line += f"/{self.total / 1e6:.1f} MB ({100 * done / self.total:.0f}%)"
            line += f", {rate:.1f} MB/s, ETA {eta:.0f} s"
        else:
            line += f" MB, {rate:.1f} MB/s"
        self.log(line)

    def finish(self, done: int) -> None:
        took = time.monotonic() - self.t0
        resumed = f" (resumed at {self.start / 1e6:.1f} MB)" if self.start else ""
        self.log(f"  {self.name}: {(done - self.start) / 1e6:.1f} MB in {took:.1f} s, "
                 f"{self.rate(done):.1f} MB/s{resumed}")


def _unreachable(url: str, err: BaseException, timeout: float,
                 mirror: Optional[str] = None) -> str:
    reason = getattr(err, "reason", err)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        reason = f"no answer in {timeout:g} s"
    if mirror:  # the user named the host: it, not the internet, is what failed
        return (f"cannot reach {url} ({reason}): check the mirror {mirror} (--base_url / "
                f"${BASE_URL_ENV}) is up and serves NAME/FILE")
    return (f"cannot reach {url} ({reason}): this machine looks offline (fetch where there is "
            f"internet and copy the folder here, or name a mirror with --base_url / "
            f"${BASE_URL_ENV})")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --- a dataset -----------------------------------------------------------------------------------

def fetch_dataset(ds: Dataset, dest: str | os.PathLike, base_url: Optional[str] = None,
                  timeout: float = TIMEOUT, allow_unpinned: bool = False, convert: bool = True,
                  log=print) -> list[str]:
    """Every file of ``ds`` into ``dest/<its folder>``, then OpenAI's conversion; the paths."""
    timeout, mirror = check_timeout(timeout), mirror_of(base_url)
    folder = os.path.join(str(dest), ds.where)
    paths, fresh = [], False
    for remote in ds.files:
        url = url_of(ds, remote, base_url)
        log(f"{ds.name}: {url}")
        path, downloaded = download(remote, folder, url, timeout, allow_unpinned, log, mirror)
        paths.append(path)
        fresh = fresh or downloaded
    if ds.checkpoint_folder and convert:
        from sentdisc.checkpoint import ensure_openai_checkpoint  # torch: only when converting

        out = ensure_openai_checkpoint(folder, os.path.join(str(dest), ds.checkpoint_folder),
                                       force=fresh, log=log)
        log(f"{ds.name}: checkpoint {out} (use it as --load_model {out} or --load_model openai)")
    return paths


def fetch(name: str, dest: str | os.PathLike, **kw) -> list[str]:
    if name not in REGISTRY:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return fetch_dataset(REGISTRY[name], dest, **kw)


def fetch_command(name: str, dest: str | os.PathLike) -> str:
    return f"sentdisc data fetch {name} --dest {dest}"


# --- the default corpus on a fresh machine -------------------------------------------------------

def fetch_default_corpus(path: str, log=print) -> bool:
    """When ``path`` is the default pretraining corpus (``$SENTDISC_DATA/amazon_blitzer/
    reviews``, what jobs/configs/local.yaml reads) and holds nothing, fetch the Amazon sample
    into it and return True; False for any other path (a missing path the user gave stays an
    error). Offline, a DataError in seconds naming the command to run."""
    from sentdisc.config import default_data_dir
    from sentdisc.data.config import DataError

    root = default_data_dir()
    if "://" in str(path) or os.path.abspath(path) != os.path.abspath(root / DEFAULT_CORPUS):
        return False
    log(f"[data] {path} (the default corpus) is absent: fetching the sample corpus "
        f"{SAMPLE_CORPUS} into it, as `{fetch_command(SAMPLE_CORPUS, root)}` does")
    try:
        fetch(SAMPLE_CORPUS, root, log=log)
    except FetchError as e:
        raise DataError(f"{path}: the default corpus is absent and the sample could not be "
                        f"fetched ({e}). Run `{fetch_command(SAMPLE_CORPUS, root)}`, or pass "
                        "--train PATH") from None
    return True


# --- command line --------------------------------------------------------------------------------

def main(argv=None) -> int:
    from sentdisc.config import default_data_dir

    p = argparse.ArgumentParser(
        prog="sentdisc data fetch",
        description="Download a public dataset, verified by SHA-256 / git blob id / shape, "
                    "resuming partial downloads",
        epilog="datasets: " + "; ".join(f"{k}: {v.about}" for k, v in REGISTRY.items()))
    p.add_argument("name", choices=sorted(REGISTRY))
    p.add_argument("--dest", default=str(default_data_dir()),
                   help="data folder to write into (default $SENTDISC_DATA, else ../shared/data)")
    p.add_argument("--base_url", default=None,
                   help=f"fetch every file from BASE_URL/NAME/FILE (a mirror; ${BASE_URL_ENV})")
    p.add_argument("--no_convert", action="store_true",
                   help="openai_weights: do not convert the .npy files into openai_checkpoint/")
    p.add_argument("--allow_unpinned", action="store_true",
                   help="accept a file that has neither a pinned hash nor a content check")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help="seconds to connect and to wait for each read")
    args = p.parse_args(argv)
    try:
        paths = fetch(args.name, args.dest, base_url=args.base_url, timeout=args.timeout,
                      allow_unpinned=args.allow_unpinned, convert=not args.no_convert)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: {len(paths)} files in {os.path.join(args.dest, REGISTRY[args.name].where)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
