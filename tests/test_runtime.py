"""Connecting to Ray: a head node killed without `ray stop` must not make jobs hang."""
import socket

from sentdisc.runtime import address_file, reachable, stale_cluster_address


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_a_recorded_address_nothing_answers_at_is_stale(tmp_path):
    record = tmp_path / "ray_current_cluster"
    record.write_text(f"127.0.0.1:{_closed_port()}\n")
    assert stale_cluster_address(record) == record.read_text().strip()


def test_a_live_cluster_address_is_not_stale(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        record = tmp_path / "ray_current_cluster"
        record.write_text(f"127.0.0.1:{server.getsockname()[1]}")
        assert reachable(record.read_text())
        assert stale_cluster_address(record) is None


def test_no_record_means_nothing_stale(tmp_path):
    assert stale_cluster_address(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("")
    assert stale_cluster_address(tmp_path / "empty") is None


def test_garbage_addresses_are_unreachable():
    assert not reachable("not-an-address")
    assert not reachable("127.0.0.1:notaport")


def test_address_file_is_rays_own():
    assert address_file().name == "ray_current_cluster"


def test_a_stale_address_file_is_removed(tmp_path, monkeypatch):
    import sentdisc.runtime as runtime

    record = tmp_path / "ray_current_cluster"
    record.write_text(f"127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(runtime, "address_file", lambda: record)
    assert runtime.forget_stale_cluster()
    assert not record.exists()
    assert not runtime.forget_stale_cluster()  # nothing left to forget
