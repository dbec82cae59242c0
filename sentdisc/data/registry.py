"""What ``sentdisc data fetch`` can download, and the one rule a downloaded file must pass.

A ``Dataset`` is a few ``RemoteFile``s written to one folder under ``--dest``; the folders are
the layout of ``../shared/data`` (``sst2/``, ``openai_weights/``, ``amazon_blitzer/reviews/``),
so a fetched data dir and the shared one are read by the same paths. A file is pinned by its
SHA-256 or by its **git blob id** (SHA-1 of ``b"blob <size>\\0" + content``: what a GitHub
tree records, so a file committed to a repository is pinned without downloading it), plus,
for a ``.npy`` file, the shape and dtype in its header. A file no one publishes a hash for is
checked by its content instead (``check``) and reported as unpinned. ``verify`` applies all of
it, and is the only place that does.

Nothing is unpickled: a ``.npy`` header is read with NumPy's header parser (a Python literal),
never ``np.load``.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sentdisc.errors import InputError


class VerifyError(InputError):
    """A file that is not the one its registry entry pins."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    name: str                          # file name in the dataset's folder (kept as shipped)
    sha256: Optional[str] = None       # pin by SHA-256 of the file ...
    git_blob: Optional[str] = None     # ... or by its git blob id
    shape: Optional[tuple] = None      # a .npy file's array shape, from its header
    dtype: Optional[str] = None        # and its dtype (numpy name, e.g. "float32")
    check: Optional[Callable[[str], str]] = None  # content check of an unpinned file


@dataclass(frozen=True)
class Dataset:
    name: str
    about: str
    files: tuple
    folder: str = ""             # under --dest; default: the name
    checkpoint_folder: str = ""  # OpenAI weights: converted into a sentdisc checkpoint here

    @property
    def where(self) -> str:
        return self.folder or self.name


# --- hashes and headers ------------------------------------------------------------------------

def _hash_file(h, path: str) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: str) -> str:
    return _hash_file(hashlib.sha256(), path)


def git_blob_id(path: str) -> str:
    """The id git gives the file's content: SHA-1 of ``blob <size>\\0`` + content."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % os.path.getsize(path))
    return _hash_file(h, path)


def npy_header(path: str) -> tuple[tuple, str]:
    """(shape, dtype name) from a ``.npy`` header; VerifyError when it is not one."""
    fmt = np.lib.format
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    with open(path, "rb") as f:
        try:
            version = fmt.read_magic(f)
            shape, _, dtype = readers[version](f)
        except KeyError:
            raise VerifyError(f"unsupported .npy version {version}") from None
        except (ValueError, OSError, EOFError) as e:
            raise VerifyError(f"not a .npy file ({e})") from None
    return tuple(shape), dtype.name


# --- the one rule --------------------------------------------------------------------------------

def verify(remote: RemoteFile, path: str, allow_unpinned: bool = False) -> str:
    """Check ``path`` against ``remote``; return what was checked, raise VerifyError naming
    the file with what was expected and what it holds. The header is checked before the
    hash because it says more (an HTML error page is "not a .npy file", not just a hash)."""
    name = remote.name
    done = []
    try:
        if remote.shape is not None:
            done.append(_check_npy(remote, path))
        if remote.git_blob or remote.sha256:
            done.append(_check_hash(remote, path))
        elif remote.check is not None:
            done.append(f"unpinned (no published hash), content checked: {remote.check(path)}; "
                        f"sha256 {sha256_of(path)}")
        elif not allow_unpinned:
            raise VerifyError(f"no hash pinned for this file (the download has sha256 "
                              f"{sha256_of(path)}); rerun with --allow_unpinned to accept it")
        else:
            done.append(f"unpinned, accepted; sha256 {sha256_of(path)}")
    except VerifyError as e:
        raise VerifyError(f"{name}: {e}") from None
    return ", ".join(done)


def _check_npy(remote: RemoteFile, path: str) -> str:
    shape, dtype = npy_header(path)
    want = (list(remote.shape), remote.dtype or dtype)
    if (list(shape), dtype) != want:
        raise VerifyError(f"expected shape {want[0]} {want[1]}, got {list(shape)} {dtype}")
    return f"shape {list(shape)} {dtype} ok"


def _check_hash(remote: RemoteFile, path: str) -> str:
    kind, want, got = (("git blob id", remote.git_blob, git_blob_id(path)) if remote.git_blob
                       else ("sha256", remote.sha256, sha256_of(path)))
    if got != want:
        raise VerifyError(f"expected {kind} {want}, got {got}")
    return f"{kind} ok"


@dataclass(frozen=True)
class ReviewSampleCheck:
    """What an unpinned gzipped loose-JSON review dump must look like: its size, how many
    records, and the fields every record carries. Reads the whole file (a few MB)."""
    min_bytes: int
    max_bytes: int
    min_records: int
    max_records: int
    fields: tuple = ("reviewText", "overall")

    def __call__(self, path: str) -> str:
        size = os.path.getsize(path)
        if not self.min_bytes <= size <= self.max_bytes:
            raise VerifyError(f"expected {self.min_bytes / 1e6:g}-{self.max_bytes / 1e6:g} MB, "
                              f"got {size / 1e6:.2f} MB")
        n = self._count(path)
        if not self.min_records <= n <= self.max_records:
            raise VerifyError(f"expected {self.min_records}-{self.max_records} records, got {n}")
        return f"{n} records with {', '.join(self.fields)}, {size / 1e6:.1f} MB"

    def _count(self, path: str) -> int:
        n = 0
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    record = json.loads(line)
                    missing = [k for k in self.fields if not isinstance(record, dict)
                               or record.get(k) is None]
                    if missing:
                        raise VerifyError(f"record {n} lacks {missing}")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
            raise VerifyError(f"not a readable gzip file ({e})") from None
        except json.JSONDecodeError as e:
            raise VerifyError(f"record {n} is not JSON ({e})") from None
        return n


# --- the registry --------------------------------------------------------------------------------

OPENAI_RAW = ("https://raw.githubusercontent.com/openai/generating-reviews-discovering-sentiment/"
              "master/model")
OPENAI_WEIGHTS_DIR, OPENAI_CHECKPOINT_DIR = "openai_weights", "openai_checkpoint"
# The git blob ids of model/0.npy .. model/14.npy at commit 0032e4b (as the repository's tree
# records them; ../shared/data/openai_weights/README.md lists them, 8 checked against files).
OPENAI_BLOBS = (
    "64046c2bfcc46b04001ecc72c523fa06ea49da26", "48a9ce0d01b7f8394345f3587559ce8ce7e47841",
    "9a78f2c8f5447d0eb2c93d6f8f2632483441a072", "8dc8daffdd0317fe2062ce7730608f2d1ace7737",
    "90ff06565ee66227c075ea724d010a0dd87b76d9", "181109eb9fbea7529d9ccbbade234365f40914ee",
    "875fadb36c969edabffd35df7702c80de2fb895e", "5f946abd4eb767a0c04941eb90f8bee718ccceef",
    "3fd585ae5e53cae155ea8b760950db24ab13424b", "45d5ce521c7b10f3e6ccc702f902846e3e1d4216",
    "068c953b192b871251d2b67f4c3c4cf76700dbf1", "4266d2a2ffde97cc74cb54707f5b6fc74b924cea",
    "6116d17dec7f722b55248e632c25be47cf13b6a4", "21a442e141da569d96d1739aa9fe3277544255ef",
    "0f452d14e0ac21f47c4c68de3b4427dee9b5ce6a",
)


def openai_shapes(E: int = 64, H: int = 4096) -> list[tuple]:
    """Shapes of 0.npy..14.npy for embedding size E and H units (OpenAI's: E=64, H=4096):
    embedding, wx, wh in four [H, H] pieces (axis 1), wmx, wmh, b, gx, gh, gmx, gmh, out w,
    out b. ``checkpoint.load_openai`` checks the same list."""
    return [(256, E), (E, 4 * H)] + [(H, H)] * 4 + [(E, H), (H, H), (4 * H,), (4 * H,), (4 * H,),
                                                    (H,), (H,), (H, 256), (256,)]


def openai_dataset(blobs=OPENAI_BLOBS, E: int = 64, H: int = 4096, base: str = OPENAI_RAW,
                   name: str = OPENAI_WEIGHTS_DIR) -> Dataset:
    """OpenAI's 15-file release (or, with other blob ids and sizes, one laid out like it)."""
    files = tuple(RemoteFile(url=f"{base}/{i}.npy", name=f"{i}.npy", git_blob=blob, shape=shape,
                             dtype="float32")
                  for i, (blob, shape) in enumerate(zip(blobs, openai_shapes(E, H))))
    return Dataset(name, f"OpenAI's mLSTM-{H} sentiment-neuron weights (Radford et al. 2017), "
                   f"15 .npy files, converted into {OPENAI_CHECKPOINT_DIR}/", files,
                   checkpoint_folder=OPENAI_CHECKPOINT_DIR)


_NVIDIA_SST = "https://raw.githubusercontent.com/NVIDIA/sentiment-discovery/master/data/binary_sst"
# What jobs/configs/local.yaml reads under $SENTDISC_DATA. The Blitzer corpus that fills it on
# the shared machine has no downloadable JSON release, so a fresh machine gets the Amazon
# sample there instead: the same fields, the same reader.
DEFAULT_CORPUS = "amazon_blitzer/reviews"
SAMPLE_CORPUS = "amazon_sample"

REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    Dataset("sst2", "Binary SST-2 splits (label,sentence) used by Radford et al. 2017 and NVIDIA",
            # Hashes of the copies in ../shared/data/sst2 (same rows and columns as NVIDIA's
            # files); not checked against the remote from this offline machine.
            (RemoteFile(f"{_NVIDIA_SST}/train.csv", "train.csv", sha256=(
                "6003623bcb35aad3a446a265b8931b7ccab61fcc10f2e9c1fec916ff67c7be35")),
             RemoteFile(f"{_NVIDIA_SST}/val.csv", "val.csv", sha256=(
                 "f34c4987fea208fefc2d62a1b42c83a766cbfc7ce58c2a878ef953cf91f01729")),
             RemoteFile(f"{_NVIDIA_SST}/test.csv", "test.csv", sha256=(
                 "519cea7ed4d22fe7ec4eccbb3d5ba6d88902a3b15ce129f476aa8364463a9fc7")))),
    Dataset(SAMPLE_CORPUS, "Amazon reviews, Musical Instruments 5-core (McAuley 2014 dump format: "
            f"loose JSON, reviewText), ~10k reviews, into {DEFAULT_CORPUS}/: the corpus "
            "jobs/configs/local.yaml pretrains on",
            # No hash is published for this file and it was never seen from this machine, so
            # it is checked by what it holds (10,261 reviews in the 2014 release).
            (RemoteFile("http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
                        "reviews_Musical_Instruments_5.json.gz", "reviews_Musical_Instruments_5.json.gz",
                        check=ReviewSampleCheck(500_000, 20_000_000, 5_000, 20_000)),),
            folder=DEFAULT_CORPUS),
    openai_dataset(),
)}
