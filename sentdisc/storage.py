"""One storage layer for everything a job reads or writes: local paths, ``file://``, ``s3://``,
``gs://`` and anything else pyarrow resolves.

It sits on pyarrow filesystems, the ones Ray Train and Ray Data use, so a URI means the same
thing to the driver, to Ray Data's read tasks and to Ray Train's checkpointing. Credentials and
endpoints come from each backend's standard environment and config, never from flags: for S3
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or a profile, or an instance role),
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for S3-compatible servers;
``s3://anonymous@bucket/...`` reads a public bucket. Writes are atomic: a local file is written
under a hidden name beside its own and renamed, an object store receives one PUT, so a reader
never sees half a file. Errors name the URI and say what is wrong (no such bucket, no
credentials, endpoint unreachable) in one line. A key is every character after the bucket,
``#`` and ``?`` included: ``s3://bkt/run#1/a?b.json`` is the object ``run#1/a?b.json``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pyarrow.fs as pafs

from sentdisc.errors import InputError

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0
S3_ATTEMPTS = 3
_HIDDEN = ("_", ".")  # _SUCCESS, _manifest.json, .crc: bookkeeping files beside data files


class StorageError(InputError):
    """A URI that cannot be read or written: missing, no credentials, endpoint unreachable."""


# --- names -------------------------------------------------------------------------------------

def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI or a local path (a URI stays a URI)."""
    base = str(base)
    if not is_uri(base):
        return str(Path(base, *parts))
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _split(uri: str) -> tuple[str, str, str]:
    """(scheme, authority, key) of ``scheme://authority/key``, split by hand: urlparse ends the
    key at the first '#' or '?', yet S3 and GCS keys may hold both (a run named ``run#1``), and
    cut there, every output of such a run would land on one object."""
    scheme, _, rest = str(uri).partition("://")
    authority, _, key = rest.partition("/")
    return scheme.lower(), authority, key.rstrip("/")


def _user_host(authority: str) -> tuple[str, str]:
    user, _, host = authority.rpartition("@")
    return user, host


def basename(uri: str) -> str:
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


# --- filesystems -------------------------------------------------------------------------------

def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or URI."""
    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    scheme, authority, key = _split(uri)
    if scheme in ("s3", "s3a"):
        user, bucket = _user_host(authority)
        return _s3(user == "anonymous"), f"{bucket}/{key}" if key else bucket
    try:  # pyarrow, too, would end the key at '#' or '?': it resolves the root, the key is ours
        fs, root = pafs.FileSystem.from_uri(f"{scheme}://{authority}/")
    except (ValueError, OSError) as e:
        raise StorageError(f"{uri}: cannot open this storage: {_first_line(e)}") from None
    root = root.rstrip("/")
    return fs, f"{root}/{key}" if key else root or "/"


@functools.lru_cache(maxsize=4)
def _s3(anonymous: bool) -> pafs.S3FileSystem:
    """S3 (or an S3-compatible server) with short timeouts and few retries, so a wrong
    endpoint fails in seconds rather than minutes of the SDK's backoff."""
    kw: dict[str, Any] = dict(
        anonymous=anonymous, connect_timeout=CONNECT_TIMEOUT_S,
        request_timeout=REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))
    endpoint = s3_endpoint()
    if endpoint:
        kw["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kw["scheme"] = "http"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        kw["region"] = region
    return pafs.S3FileSystem(**kw)


def s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def for_ray(uri: str) -> tuple[str, Optional[pafs.FileSystem]]:
    """``(path, filesystem)`` to hand Ray Train (``storage_path``, ``storage_filesystem``) or
    Ray Data (paths, ``filesystem``) so they reach ``uri`` with this layer's settings; a local
    path goes as it is, with no filesystem."""
    if not is_uri(uri):
        return absolute(uri), None
    fs, path = filesystem(uri)
    return path, fs


# --- checks: one clear line before any worker starts --------------------------------------------

def check_access(uri: str, what: str = "path") -> None:
    """Fail now, naming the URI, if ``uri``'s storage cannot be used: no credentials, the
    endpoint does not answer, the bucket does not exist."""
    if not is_uri(uri):
        return
    scheme, authority, _ = _split(uri)
    if scheme in ("s3", "s3a"):
        if _user_host(authority)[0] != "anonymous" and not _aws_credentials_available():
            raise StorageError(
                f"{what} {uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run on a node with an instance "
                f"role); a public bucket reads as s3://anonymous@bucket/...")
        fs, path = filesystem(uri)
        bucket = path.split("/", 1)[0]
        info = _info(fs, bucket, f"{what} {uri}")
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{what} {uri}: bucket {bucket!r} does not exist"
                               + (f" at {s3_endpoint()}" if s3_endpoint() else ""))


def _aws_credentials_available() -> bool:
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if any(env.get(k) for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                                "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    files = [env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             env.get("AWS_CONFIG_FILE", "~/.aws/config")]
    if any(os.path.isfile(os.path.expanduser(f)) for f in files):
        return True
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return False
    try:  # an instance role: the metadata service answers on EC2 (and compatible clouds)
        with socket.create_connection(("169.254.169.254", 80), timeout=0.5):
            return True
    except OSError:
        return False


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise _storage_error(uri, e) from None


def _storage_error(uri: str, e: BaseException) -> StorageError:
    text = str(e)
    if "NETWORK_CONNECTION" in text or "Could not connect" in text or "curlCode: 7" in text \
            or "Could not resolve" in text:
        where = s3_endpoint() or _user_host(_split(uri)[1])[1]
        return StorageError(f"{uri}: cannot reach the storage endpoint {where} "
                            f"({_first_line(e)})")
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        return StorageError(f"{uri}: access denied: check the credentials and the bucket's "
                            f"policy ({_first_line(e)})")
    return StorageError(f"{uri}: {_first_line(e)}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --- what is there -----------------------------------------------------------------------------

def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _info(fs, path, uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _info(fs, path, uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return _info(fs, path, uri).type == pafs.FileType.File


def list_dir(uri: str) -> list[str]:
    """Names directly inside a folder (sorted); [] when it does not exist."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _storage_error(uri, e) from None
    return sorted(info.base_name for info in infos)


def list_files(uri: str) -> list[tuple[str, int]]:
    """Every data file below a folder, recursively, as (URI, size), sorted; names starting
    with '_' or '.' (and what is below such folders) are bookkeeping and skipped."""
    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as e:
        raise _storage_error(uri, e) from None
    out = []
    for info in infos:
        rel = info.path[len(path):].lstrip("/")
        if info.type != pafs.FileType.File or any(p.startswith(_HIDDEN) for p in rel.split("/")):
            continue
        out.append((join(uri, rel), info.size))
    return sorted(out)


# --- reading -----------------------------------------------------------------------------------

def open_input(uri: str, compression: Optional[str] = None):
    """A readable stream (decompressed when ``compression`` is given or "detect")."""
    fs, path = filesystem(uri)
    try:
        return fs.open_input_stream(path, compression=compression)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except OSError as e:
        raise _storage_error(uri, e) from None


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str, error: type[InputError] = StorageError, what: str = "") -> Any:
    """A JSON file's value; a missing or malformed file raises ``error`` naming it."""
    label = f"{what} {uri}".strip()
    try:
        raw = read_bytes(uri)
    except StorageError as e:
        raise error(f"{label} does not exist" if "no such file" in str(e) else str(e)) from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{label} is not valid JSON: {e}") from None


# --- writing -----------------------------------------------------------------------------------

def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise _storage_error(uri, e) from None


def temp_beside(path: str | os.PathLike) -> str:
    """A unique name beside local ``path`` to write before renaming onto it; hidden (a leading
    '.'), so a listing of data files (``list_files``, a corpus) never reads a half-written one."""
    path = Path(path)
    return str(path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"))


def write_bytes(uri: str, data: bytes) -> str:
    """Write a whole file atomically: readers see the old content or the new, never half."""
    fs, path = filesystem(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = temp_beside(path)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:  # a failed write or rename leaves no temp file beside the data
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:  # an object store: one PUT, visible only once complete
            # compression=None: pyarrow's default ('detect') would gzip a .gz name again
            with fs.open_output_stream(path, compression=None) as f:
                f.write(data)
    except OSError as e:
        raise _storage_error(uri, e) from None
    return uri


def write_text(uri: str, text: str) -> str:
    return write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any, indent: int = 2) -> str:
    return write_text(uri, json.dumps(obj, indent=indent))


def remove_tree(uri: str) -> None:
    fs, path = filesystem(uri)
    with contextlib.suppress(FileNotFoundError):
        try:
            fs.delete_dir(path)
        except OSError as e:
            if _info(fs, path, uri).type != pafs.FileType.NotFound:
                raise _storage_error(uri, e) from None


def copy_tree(src: str, dst: str) -> str:
    """Copy a folder (any storage to any storage); ``dst`` is replaced."""
    return copy_from(*filesystem(src), dst)


def copy_from(src_fs: pafs.FileSystem, src_path: str, dst: str) -> str:
    """Copy a folder given as (filesystem, path), e.g. a Ray Train checkpoint's, to ``dst``
    (replaced), on any storage."""
    dst_fs, dst_path = filesystem(dst)
    remove_tree(dst)
    try:
        dst_fs.create_dir(dst_path, recursive=True)  # a local destination needs its folders
        for info in src_fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
            if info.type == pafs.FileType.Directory:
                dst_fs.create_dir(dst_path + info.path[len(src_path):], recursive=True)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs,
                        destination_filesystem=dst_fs)
    except OSError as e:
        raise _storage_error(dst, e) from None
    return dst


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local folder holding ``uri``'s files: the folder itself when it is local, else a
    temporary download that is removed afterwards."""
    if not is_uri(uri) or _split(uri)[0] == "file":
        yield Path(filesystem(uri)[1])
        return
    tmp = tempfile.mkdtemp(prefix="sentdisc-")
    try:
        local = os.path.join(tmp, basename(uri) or "dir")
        if not is_dir(uri):
            raise StorageError(f"{uri}: no such folder")
        copy_tree(uri, local)
        yield Path(local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upload(local: str | os.PathLike, uri: str) -> str:
    """A local folder to ``uri`` (replaced)."""
    return copy_tree(str(local), uri)


def savefig_bytes(fig, **kw) -> bytes:
    """A matplotlib figure as PNG bytes, for write_bytes to any storage."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    return buf.getvalue()
