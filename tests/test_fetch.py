"""``sentdisc data fetch`` against a real HTTP server on 127.0.0.1 (Range support, a log of the
requests): verification by git blob id / SHA-256 / .npy shape, resume, OpenAI's conversion,
fast failure offline, and the default corpus fetched on a fresh machine. No Ray."""
import gzip
import hashlib
import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_checkpoint import _openai_numpy_encoder, _write_openai

from sentdisc import featurize, load
from sentdisc.config import expand
from sentdisc.data import fetch as F
from sentdisc.data.registry import (
    DEFAULT_CORPUS,
    REGISTRY,
    Dataset,
    RemoteFile,
    VerifyError,
    git_blob_id,
    openai_dataset,
    verify,
)
from sentdisc.text import encode


class Server:
    """Files under ``root`` at ``/<path>``; honours ``Range: bytes=N-`` unless ignore_range;
    ``log`` holds (path, Range header) of every GET."""

    def __init__(self, root: Path, ignore_range: bool = False):
        self.root, self.ignore_range, self.log = Path(root), ignore_range, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    return self.send_error(404)
                data = path.read_bytes()
                start = _range_start(self.headers.get("Range"))
                if start is None or server.ignore_range:
                    self.send_response(200)
                elif start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                else:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                    data = data[start:]
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _range_start(header):
    if header and header.startswith("bytes=") and header.endswith("-"):
        return int(header[len("bytes="):-1])
    return None


@pytest.fixture
def serve():
    servers = []

    def start(root, **kw):
        servers.append(Server(root, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there: connection refused


def _npy(path: Path, array) -> RemoteFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return RemoteFile(url="unused", name=path.name, git_blob=git_blob_id(str(path)),
                      shape=array.shape, dtype=str(array.dtype))


# --- verification ----------------------------------------------------------------------------------

def test_git_blob_id_is_gits(tmp_path):
    (tmp_path / "f").write_bytes(b"hello\n")
    assert git_blob_id(str(tmp_path / "f")) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_real_openai_files_verify_by_blob_id_and_shape(shared_data, serve, tmp_path):
    src = shared_data / "openai_weights"
    present = [f for f in REGISTRY["openai_weights"].files if (src / f.name).is_file()]
    if not present:
        pytest.skip(f"none of OpenAI's .npy files are in {src}")
    for remote in present:  # the pins and shapes of the registry hold for the real files
        assert "git blob id ok" in verify(remote, str(src / remote.name)), remote.name
    server = serve(shared_data)
    ds = Dataset("openai_weights", "the files present", tuple(present))
    lines = []
    paths = F.fetch_dataset(ds, tmp_path, base_url=server.url, log=lines.append)
    assert len(paths) == len(present) == 8
    for p in paths:
        assert Path(p).read_bytes() == (src / Path(p).name).read_bytes()
    assert sum("git blob id ok" in line for line in lines) == 8
    assert not list((tmp_path / "openai_weights").glob(".*.part"))


def test_one_changed_byte_is_rejected_and_deleted(serve, tmp_path):
    remote = _npy(tmp_path / "mirror" / "ds" / "14.npy", np.arange(256, dtype=np.float32))
    path = tmp_path / "mirror" / "ds" / "14.npy"
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    server = serve(tmp_path / "mirror")
    with pytest.raises(F.FetchError) as e:
        F.fetch_dataset(Dataset("ds", "", (remote,)), tmp_path / "out", base_url=server.url,
                        log=lambda s: None)
    msg = str(e.value)
    assert "14.npy" in msg and f"expected git blob id {remote.git_blob}, got " \
        f"{git_blob_id(str(path))}" in msg and "deleted" in msg
    assert not list((tmp_path / "out" / "ds").iterdir())  # neither the file nor a .part


def test_wrong_shape_is_rejected_by_the_header(serve, tmp_path):
    # Same bytes, transposed shape: same size, and the pinned blob id is this file's, so only
    # the shape check can catch it.
    wrong = _npy(tmp_path / "mirror" / "ds" / "0.npy", np.zeros((64, 256), np.float32))
    remote = RemoteFile("unused", "0.npy", git_blob=wrong.git_blob, shape=(256, 64), dtype="float32")
    server = serve(tmp_path / "mirror")
    with pytest.raises(F.FetchError, match=r"0\.npy: expected shape \[256, 64\] float32, got "
                                           r"\[64, 256\] float32"):
        F.fetch_dataset(Dataset("ds", "", (remote,)), tmp_path / "out", base_url=server.url,
                        log=lambda s: None)
    assert not (tmp_path / "out" / "ds" / "0.npy").exists()
    (tmp_path / "page.npy").write_text("<html>rate limited</html>")
    with pytest.raises(VerifyError, match=r"page\.npy: not a \.npy file"):
        verify(RemoteFile("u", "page.npy", git_blob="0" * 40, shape=(3,)), str(tmp_path / "page.npy"))


# --- resume ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_range", [False, True])
def test_resume_requests_only_the_rest(serve, tmp_path, ignore_range):
    array = np.random.default_rng(0).normal(size=(512, 512)).astype(np.float32)  # 1 MB
    remote = _npy(tmp_path / "mirror" / "ds" / "w.npy", array)
    full = (tmp_path / "mirror" / "ds" / "w.npy").read_bytes()
    half = len(full) // 2
    out = tmp_path / "out" / "ds"
    out.mkdir(parents=True)
    Path(F.part_path(out / "w.npy")).write_bytes(full[:half])
    server = serve(tmp_path / "mirror", ignore_range=ignore_range)
    lines = []
    F.fetch_dataset(Dataset("ds", "", (remote,)), tmp_path / "out", base_url=server.url,
                    log=lines.append)
    assert (out / "w.npy").read_bytes() == full
    assert server.log == [("/ds/w.npy", f"bytes={half}-")]
    said = "ignored the Range request" if ignore_range else f"resuming at {half / 1e6:.1f} MB"
    assert any(said in line for line in lines), lines
    assert any("MB/s" in line for line in lines)
    # Present and verified: nothing is requested again.
    F.fetch_dataset(Dataset("ds", "", (remote,)), tmp_path / "out", base_url=server.url,
                    log=lines.append)
    assert len(server.log) == 1


def test_progress_is_a_line_every_few_seconds_not_a_flood():
    lines = []
    p = F.Progress("7.npy", 0, 100_000_000, lines.append, every=0.05)
    for i in range(1, 101):
        p.update(i * 1_000_000)
        if i % 25 == 0:
            time.sleep(0.06)
    p.finish(100_000_000)
    assert 2 <= len(lines) <= 6, lines
    assert "%" in lines[0] and "MB/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("  7.npy: 100.0 MB in")


# --- OpenAI's layout -> a checkpoint ---------------------------------------------------------------

def test_openai_layout_fetched_and_converted_featurizes_like_numpy(serve, tmp_path, monkeypatch):
    # The full 15-file layout at a reduced size (E=8, H=32): mLSTM-4096's files are ~345 MB,
    # too much for a fast test; the same code checks both (openai_shapes(E, H)).
    E, H = 8, 32
    params = _write_openai(tmp_path / "mirror" / "openai_weights", E=E, H=H)
    blobs = [git_blob_id(str(tmp_path / "mirror" / "openai_weights" / f"{i}.npy"))
             for i in range(15)]
    server = serve(tmp_path / "mirror")
    data = tmp_path / "data"
    lines = []
    F.fetch_dataset(openai_dataset(blobs, E=E, H=H), data, base_url=server.url, log=lines.append)
    ckpt = data / "openai_checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    text = "This product is great!"
    _, ref_c = _openai_numpy_encoder(params, encode(text))
    np.testing.assert_allclose(featurize(load(ckpt), [text])[0], ref_c, atol=1e-5)
    # --load_model openai finds it in the default data dir.
    monkeypatch.setenv("SENTDISC_DATA", str(data))
    np.testing.assert_allclose(featurize(load("openai"), [text])[0], ref_c, atol=1e-5)


def test_registry_openai_entry_matches_the_release():
    ds = REGISTRY["openai_weights"]
    assert [f.name for f in ds.files] == [f"{i}.npy" for i in range(15)]
    assert ds.files[2].url == ("https://raw.githubusercontent.com/openai/"
                               "generating-reviews-discovering-sentiment/master/model/2.npy")
    assert [f.shape for f in ds.files][:3] == [(256, 64), (64, 16384), (4096, 4096)]
    assert ds.files[13].shape == (4096, 256) and ds.files[14].git_blob.startswith("0f452d14")
    assert all(f.git_blob or f.sha256 for d in ("sst2", "openai_weights") for f in REGISTRY[d].files)


# --- offline ---------------------------------------------------------------------------------------

def test_unreachable_fails_fast_naming_the_url(tmp_path, capsys):
    url = closed_port_url()
    t0 = time.monotonic()
    rc = F.main(["openai_weights", "--dest", str(tmp_path), "--base_url", url, "--timeout", "1"])
    assert rc == 2 and time.monotonic() - t0 < 5
    assert f"cannot reach {url}/openai_weights/0.npy" in capsys.readouterr().err



@pytest.mark.parametrize("dest", ["/proc/sentdisc-dest", "a-file/data"])
def test_an_unwritable_dest_is_one_line(dest, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")  # a folder cannot be made below a file
    dest = dest if dest.startswith("/") else str(tmp_path / dest)
    url = closed_port_url()  # never reached: the folder fails first, and nothing downloads
    assert F.main(["sst2", "--dest", dest, "--base_url", url, "--timeout", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot create {dest}/sst2 (") and len(err.splitlines()) == 1
    assert err.endswith("): pass --dest a writable folder")


def test_a_silent_host_times_out_in_seconds(tmp_path):
    with socket.socket() as s:  # accepts connections (the kernel does) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(F.FetchError, match=rf"cannot reach {url}/sst2/train.csv \(no answer in 1 s\)"):
            F.fetch("sst2", tmp_path, base_url=url, timeout=1, log=lambda s: None)
        assert time.monotonic() - t0 < 5


# --- a fresh machine: the default corpus ------------------------------------------------------------

def _sample_gz(path: Path, n: int = 6000) -> None:
    """A dump-shaped review file the registry's content check accepts (hex text: it does not
    compress away below the check's minimum size)."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"reviewerID": f"A{i}", "asin": "B0", "reviewText": rng.bytes(120).hex(),
                         "overall": float(1 + i % 5), "summary": "ok"}) for i in range(n))
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")


def _local_yaml_train(monkeypatch, data: Path) -> str:
    """The corpus path the README's first command reads, as its config parser expands it."""
    monkeypatch.setenv("SENTDISC_DATA", str(data))
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/configs/local.yaml").read_text())
    return expand(config["data"]["train"])


def test_fresh_machine_fetches_the_sample_corpus(serve, tmp_path, monkeypatch, capsys):
    from sentdisc.data.config import DataConfig, compression_of, file_format
    from sentdisc.data.paths import list_corpus

    name = REGISTRY["amazon_sample"].files[0].name
    _sample_gz(tmp_path / "mirror" / "amazon_sample" / name)
    server = serve(tmp_path / "mirror")
    monkeypatch.setenv(F.BASE_URL_ENV, server.url)
    train = _local_yaml_train(monkeypatch, tmp_path / "empty")
    files = list_corpus(train)
    out = capsys.readouterr().out
    assert "the default corpus) is absent: fetching the sample corpus amazon_sample" in out
    assert "unpinned (no published hash), content checked: 6000 records" in out
    assert [Path(u).name for u, _ in files] == [name]
    assert Path(files[0][0]).parent == tmp_path / "empty" / DEFAULT_CORPUS
    assert file_format(files[0][0], DataConfig()) == "loose_json"  # what local.yaml reads
    assert compression_of(files[0][0]) == "gzip"
    assert list_corpus(train) == files and len(server.log) == 1  # fetched once


def test_fresh_machine_offline_names_the_command(tmp_path, monkeypatch):
    from sentdisc.data.config import DataError
    from sentdisc.data.paths import list_corpus

    monkeypatch.setenv(F.BASE_URL_ENV, closed_port_url())
    train = _local_yaml_train(monkeypatch, tmp_path / "empty")
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        list_corpus(train)
    assert time.monotonic() - t0 < 5
    assert f"sentdisc data fetch amazon_sample --dest {tmp_path / 'empty'}" in str(e.value)
    assert "cannot reach" in str(e.value)


def test_a_missing_user_path_is_not_fetched(serve, tmp_path, monkeypatch):
    from sentdisc.data.config import DataError
    from sentdisc.data.paths import list_corpus

    server = serve(tmp_path)
    monkeypatch.setenv(F.BASE_URL_ENV, server.url)
    monkeypatch.setenv("SENTDISC_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no such file or folder"):
        list_corpus(str(tmp_path / "my_corpus"))
    assert server.log == []


def test_a_bad_sample_is_rejected_by_its_content(serve, tmp_path):
    name = REGISTRY["amazon_sample"].files[0].name
    _sample_gz(tmp_path / "mirror" / "amazon_sample" / name, n=10)
    server = serve(tmp_path / "mirror")
    with pytest.raises(F.FetchError, match=rf"{name}: expected 0.5-20 MB, got 0.00 MB"):
        F.fetch("amazon_sample", tmp_path / "data", base_url=server.url, log=lambda s: None)
    assert not os.listdir(tmp_path / "data" / DEFAULT_CORPUS)


def test_sst2_pins_hold_for_the_shared_copies(shared_data, serve, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(shared_data / "sst2", mirror / "sst2")
    server = serve(mirror)
    paths = F.fetch("sst2", tmp_path / "data", base_url=server.url, log=lambda s: None)
    assert [Path(p).name for p in paths] == ["train.csv", "val.csv", "test.csv"]
    (mirror / "sst2" / "val.csv").write_bytes(b"label,sentence\n1,changed\n")
    os.remove(paths[1])
    with pytest.raises(F.FetchError, match="val.csv .*expected sha256 f34c4987"):
        F.fetch("sst2", tmp_path / "data", base_url=server.url, log=lambda s: None)
    assert hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest().startswith("6003623b")


@pytest.mark.parametrize("base_url", ["notaurl", "ftp://host/x", "http://", "/just/a/path"])
def test_a_base_url_that_is_not_a_url_is_one_line(base_url, tmp_path, capsys):
    # "notaurl" was a traceback: ValueError unknown url type
    assert F.main(["sst2", "--dest", str(tmp_path), "--base_url", base_url]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --base_url {base_url!r} is not a URL: it must start with http://, "
                   "https:// or file://")
    assert not (tmp_path / "sst2").exists()


def test_a_base_url_from_the_environment_is_checked_as_such(tmp_path, monkeypatch):
    monkeypatch.setenv(F.BASE_URL_ENV, "mirror.example")
    with pytest.raises(F.FetchError, match=r"\$SENTDISC_FETCH_BASE_URL 'mirror.example' is not"):
        F.fetch("sst2", tmp_path, log=lambda s: None)


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_timeout_must_be_positive(timeout, tmp_path, capsys):
    assert F.main(["sst2", "--dest", str(tmp_path), "--base_url", closed_port_url(),
                   "--timeout", timeout]) == 2
    assert "--timeout must be a number of seconds > 0" in capsys.readouterr().err


def test_a_refused_or_missing_mirror_is_not_called_offline(tmp_path, serve, capsys):
    url = closed_port_url()
    assert F.main(["sst2", "--dest", str(tmp_path), "--base_url", url, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}/sst2/train.csv" in err and f"the mirror {url}" in err
    assert "offline" not in err
    server = serve(tmp_path / "empty-mirror")  # answers, but holds nothing: 404
    assert F.main(["sst2", "--dest", str(tmp_path / "d"), "--base_url", server.url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 404" in err and f"the mirror {server.url} lacks it" in err
    assert "offline" not in err
