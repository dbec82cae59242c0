"""``sentdisc data fetch NAME --dest DIR``: download a public dataset, verified by SHA-256.

A small registry of the files a new user needs: the binary SST-2 splits that the paper and
NVIDIA's reproduction report on, and a sample of the Amazon review dump (loose JSON,
``reviewText``, kept gzipped as it ships: the readers read ``.json.gz``) to pretrain on. Every
file is checked against its SHA-256; a mismatch deletes the download and says so. A file whose
hash is not pinned yet is refused unless ``--allow_unpinned``, and its hash is printed so it
can be pinned.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RemoteFile:
    url: str
    sha256: Optional[str]   # of the downloaded file; None = not pinned yet
    name: str               # file name under --dest/<dataset>/ (kept as shipped: .gz is read)


_NVIDIA_SST = "https://raw.githubusercontent.com/NVIDIA/sentiment-discovery/master/data/binary_sst"
REGISTRY: dict[str, dict] = {
    "sst2": {
        "about": "Binary SST-2 splits (label,sentence) used by Radford et al. 2017 and NVIDIA",
        # Hashes are those of the copies in ../shared/data/sst2 (same row counts and columns as
        # NVIDIA's files); they were not checked against the remote from this machine.
        "files": [
            RemoteFile(f"{_NVIDIA_SST}/train.csv",
                       "6003623bcb35aad3a446a265b8931b7ccab61fcc10f2e9c1fec916ff67c7be35", "train.csv"),
            RemoteFile(f"{_NVIDIA_SST}/val.csv",
                       "f34c4987fea208fefc2d62a1b42c83a766cbfc7ce58c2a878ef953cf91f01729", "val.csv"),
            RemoteFile(f"{_NVIDIA_SST}/test.csv",
                       "519cea7ed4d22fe7ec4eccbb3d5ba6d88902a3b15ce129f476aa8364463a9fc7", "test.csv"),
        ],
    },
    "amazon_sample": {
        "about": "Amazon reviews, Musical Instruments 5-core (McAuley 2014 dump format: loose "
                 "JSON, reviewText), ~10k reviews: a small pretraining corpus",
        "files": [
            RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
                       "reviews_Musical_Instruments_5.json.gz", None,
                       "reviews_Musical_Instruments_5.json.gz"),
        ],
    },
}


class FetchError(RuntimeError):
    """A download that failed or did not match its hash."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_offline(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    return isinstance(reason, (socket.gaierror, socket.timeout, TimeoutError, ConnectionError,
                               OSError)) and not isinstance(err, urllib.error.HTTPError)


def download(remote: RemoteFile, dest_dir: str, allow_unpinned: bool = False,
             timeout: float = 30.0, progress=print) -> str:
    """Fetch one file into dest_dir, verify it, return its final path."""
    os.makedirs(dest_dir, exist_ok=True)
    final = os.path.join(dest_dir, remote.name)
    if os.path.exists(final) and remote.sha256 and sha256_of(final) == remote.sha256:
        progress(f"{final}: present, hash ok")
        return final
    part = final + ".part"
    try:
        with urllib.request.urlopen(remote.url, timeout=timeout) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                done += len(chunk)
                if total > (8 << 20):
                    progress(f"  {remote.name}: {done / 1e6:.1f}/{total / 1e6:.1f} MB")
    except urllib.error.HTTPError as e:
        _remove(part)
        raise FetchError(f"{remote.url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        _remove(part)
        if _is_offline(e):
            raise FetchError(f"cannot reach {remote.url} ({getattr(e, 'reason', e)}): this machine "
                             f"looks offline. Download it elsewhere and copy it to {final}, or "
                             "point --train/SENTDISC_DATA at a local copy.") from None
        raise FetchError(f"{remote.url}: {e}") from None
    digest = sha256_of(part)
    if remote.sha256 is None:
        if not allow_unpinned:
            _remove(part)
            raise FetchError(f"{remote.url}: no SHA-256 pinned for this file (downloaded one has "
                             f"{digest}); rerun with --allow_unpinned to accept it")
        progress(f"  {remote.name}: unpinned, sha256 {digest}")
    elif digest != remote.sha256:
        _remove(part)
        raise FetchError(f"{remote.url}: SHA-256 mismatch (expected {remote.sha256}, got {digest}); "
                         "the download was deleted")
    os.replace(part, final)
    return final


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fetch(name: str, dest: str, allow_unpinned: bool = False, timeout: float = 30.0,
          progress=print) -> list[str]:
    if name not in REGISTRY:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    out_dir = os.path.join(dest, name)
    paths = []
    for remote in REGISTRY[name]["files"]:
        progress(f"fetching {remote.url}")
        paths.append(download(remote, out_dir, allow_unpinned, timeout, progress))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sentdisc data fetch",
                                description="Download a public dataset with SHA-256 checks",
                                epilog="datasets: " + "; ".join(f"{k}: {v['about']}"
                                                                for k, v in REGISTRY.items()))
    p.add_argument("name", choices=sorted(REGISTRY))
    p.add_argument("--dest", default=os.environ.get("SENTDISC_DATA", "data"),
                   help="folder to write <name>/ into (default $SENTDISC_DATA or ./data)")
    p.add_argument("--allow_unpinned", action="store_true",
                   help="accept files whose SHA-256 is not pinned in the registry")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per connection")
    args = p.parse_args(argv)
    try:
        paths = fetch(args.name, args.dest, args.allow_unpinned, args.timeout)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: {len(paths)} files in {os.path.join(args.dest, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
