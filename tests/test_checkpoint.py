import json

import numpy as np
import pytest
import torch

from sentdisc import ByteLM, CheckpointError, ModelConfig, featurize, load, load_openai, save
from sentdisc.checkpoint import convert_openai, load_optimizer_state, load_train_state, read_meta


def tiny(**kw):
    torch.manual_seed(0)
    return ByteLM(ModelConfig(embed_size=8, rnn_size=16, **kw))


def test_round_trip_bit_exact(tmp_path):
    model = tiny(layers=2, weight_norm="all")
    opt = torch.optim.Adam(model.parameters())
    x = torch.randint(0, 256, (2, 9))
    model(x)[0].sum().backward()
    opt.step()
    save(model, tmp_path / "ck", optimizer_state={"optimizer": opt.state_dict(), "step": 3},
         train_state={"iteration": 7}, meta={"note": "hi"})
    loaded = load(tmp_path / "ck")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(model(x)[0], loaded(x)[0])
    state = load_optimizer_state(tmp_path / "ck")
    opt2 = torch.optim.Adam(loaded.parameters())
    opt2.load_state_dict(state["optimizer"])
    assert state["step"] == 3
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"])
    assert load_train_state(tmp_path / "ck") == {"iteration": 7}
    assert read_meta(tmp_path / "ck")["note"] == "hi"
    # Nothing in the directory is a pickle.
    for f in (tmp_path / "ck").iterdir():
        assert f.suffix in (".json", ".safetensors"), f


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(tmp_path / "empty")


def test_truncated_weights(tmp_path):
    d = save(tiny(), tmp_path / "ck")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable or truncated"):
        load(d)


def test_non_finite_weights_are_refused_with_their_names(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.layers[0].wh[0, 0] = float("nan")
    d = save(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"model.safetensors holds non-finite weights "
                                              r"\(layers.0.wh\): the run that saved it had "
                                              r"diverged; use an earlier checkpoint"):
        load(d)


def _safetensors_by_hand(path, header: dict, data: bytes = b"\0" * 8):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


@pytest.mark.parametrize("entry,got", [
    ({"dtype": "F32", "shape": [2]}, "data_offsets missing"),
    ({"dtype": "F32", "shape": [2], "data_offsets": "0,8"}, "data_offsets '0,8'"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, r"data_offsets \[0\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, None]}, r"data_offsets \[0, None\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, True]}, r"data_offsets \[0, True\]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, r"data_offsets \[8, 0\]"),
    ([0, 8], "data_offsets missing"),
])
def test_check_safetensors_names_the_file_for_a_malformed_header(tmp_path, entry, got):
    from sentdisc.checkpoint import check_safetensors, incomplete_reason

    good = _safetensors_by_hand(tmp_path / "good.safetensors",
                                {"__metadata__": {"a": "b"},
                                 "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    check_safetensors(good)  # the hand-written layout is a valid file: only `entry` is at fault
    bad = _safetensors_by_hand(tmp_path / "bad.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors: not a safetensors file "
                                              rf"\(tensor 'w': {got}, expected"):
        check_safetensors(bad)
    # a resume reads it through incomplete_reason: the same message, not a crash
    d = save(tiny(), tmp_path / "ck", train_state={"iteration": 1})
    (d / "model.safetensors").write_bytes((tmp_path / "bad.safetensors").read_bytes())
    assert "not a safetensors file (tensor 'w'" in incomplete_reason(d)


def test_mismatched_config(tmp_path):
    d = save(tiny(), tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["rnn_size"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    mismatch = r"shape mismatch .*layers.0.wh: file \[16, 64\], config expects \[32, 128\]"
    with pytest.raises(CheckpointError, match=mismatch):
        load(d)
    cfg["model"]["rnn_type"] = "gru"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: ModelConfig.rnn_type"):
        load(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load(d)


def _write_openai(d, E=6, H=10, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(256, E), (E, 4 * H), (H, H), (H, H), (H, H), (H, H), (E, H), (H, H), (4 * H,),
              (4 * H,), (4 * H,), (H,), (H,), (H, 256), (256,)]
    params = [rng.normal(size=s).astype(np.float32) * 0.5 for s in shapes]
    d.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(params):
        np.save(d / f"{i}.npy", p)
    return params


def _openai_numpy_encoder(params, text_bytes):
    """OpenAI's encoder (encoder.py, mlstm + l2-normalised weights), in NumPy float64."""
    p = [a.astype(np.float64) for a in params]
    wh = np.concatenate(p[2:6], axis=1)
    norm = lambda w, g: w / np.sqrt((w ** 2).sum(0, keepdims=True)) * g
    wx, wh, wmx, wmh = norm(p[1], p[9]), norm(wh, p[10]), norm(p[6], p[11]), norm(p[7], p[12])
    H = p[7].shape[0]
    h, c = np.zeros(H), np.zeros(H)
    sig = lambda v: 1 / (1 + np.exp(-v))
    logits = []
    for b in text_bytes:
        x = p[0][b]
        m = (x @ wmx) * (h @ wmh)
        z = x @ wx + m @ wh + p[8]
        i, f, o, u = np.split(z, 4)
        c = sig(f) * c + sig(i) * np.tanh(u)
        h = sig(o) * np.tanh(c)
        logits.append(h @ p[13] + p[14])
    return np.array(logits), c


def test_openai_import_matches_numpy_encoder(tmp_path):
    params = _write_openai(tmp_path / "oa")
    model = load_openai(tmp_path / "oa")
    from sentdisc.text import encode

    text = "This product is great!"
    b = encode(text)
    ref_logits, ref_c = _openai_numpy_encoder(params, b)
    logits, _ = model(torch.from_numpy(b.astype(np.int64))[None])
    np.testing.assert_allclose(logits[0].detach().numpy(), ref_logits, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(featurize(model, [text])[0], ref_c, atol=1e-5)
    # load() recognises the layout too, and convert writes our format.
    assert isinstance(load(tmp_path / "oa"), ByteLM)
    out = convert_openai(tmp_path / "oa", tmp_path / "converted")
    np.testing.assert_allclose(featurize(load(out), [text])[0], ref_c, atol=1e-5)


def test_openai_bad_files(tmp_path):
    _write_openai(tmp_path / "oa")
    (tmp_path / "oa" / "14.npy").unlink()
    with pytest.raises(CheckpointError, match="expected the 15 files .* found 14"):
        load_openai(tmp_path / "oa")
    _write_openai(tmp_path / "oa2")
    np.save(tmp_path / "oa2" / "8.npy", np.zeros(7, np.float32))
    with pytest.raises(CheckpointError, match=r"8.npy: expected shape \[40\] .* got \[7\]"):
        load_openai(tmp_path / "oa2")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_openai(tmp_path / "missing")


def test_convert_openai_cli(tmp_path, capsys):
    from sentdisc.cli import main

    _write_openai(tmp_path / "oa")
    assert main(["convert-openai", str(tmp_path / "oa"), str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "model.safetensors").exists()
    assert main(["convert-openai", str(tmp_path / "missing"), str(tmp_path / "ck2")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- the name "openai" ---------------------------------------------------------------------------

def test_resolve_openai_from_the_default_data_dir(tmp_path, monkeypatch, capsys):
    from sentdisc.checkpoint import OPENAI_SENTIMENT_NEURON, load_config, resolve

    monkeypatch.setenv("SENTDISC_DATA", str(tmp_path))
    assert resolve("experiments/x/checkpoint_final") == "experiments/x/checkpoint_final"
    with pytest.raises(CheckpointError, match=f"there is no {tmp_path}/openai_weights.*Run "
                                              f"`sentdisc data fetch openai_weights --dest {tmp_path}`"):
        load("openai")
    params = _write_openai(tmp_path / "openai_weights")
    (tmp_path / "openai_weights" / "13.npy").unlink()
    with pytest.raises(CheckpointError, match="openai_weights lacks 13.npy"):
        load_config("openai")
    np.save(tmp_path / "openai_weights" / "13.npy", params[13])
    # Only the .npy files: converted once into openai_checkpoint, then read from there.
    assert load_config("openai") == ModelConfig(embed_size=6, rnn_size=10, rnn_type="mlstm",
                                                weight_norm="all")
    assert resolve("openai") == tmp_path / "openai_checkpoint"
    assert "converting" in capsys.readouterr().out
    assert read_meta("openai")["source"] == "openai:openai_weights"
    from sentdisc.text import encode

    _, ref_c = _openai_numpy_encoder(params, encode("Fine."))
    np.testing.assert_allclose(featurize(load("openai"), ["Fine."])[0], ref_c, atol=1e-5)
    assert OPENAI_SENTIMENT_NEURON == 2388


def test_openai_weights_folder_config_from_headers(tmp_path):
    from sentdisc.checkpoint import load_config

    _write_openai(tmp_path / "oa", E=4, H=12)
    assert load_config(tmp_path / "oa") == ModelConfig(embed_size=4, rnn_size=12, layers=1,
                                                       rnn_type="mlstm", weight_norm="all")


def test_heatmap_of_openai_defaults_to_its_sentiment_neuron():
    from sentdisc.recipes.visualize import VisualizeConfig, resolve

    assert resolve(VisualizeConfig(load_model="openai")).neuron == 2388
    assert resolve(VisualizeConfig(load_model="openai", neuron=5)).neuron == 5
    assert resolve(VisualizeConfig(load_model="some/ckpt")).neuron == 0


@pytest.mark.parametrize("key", ["model", "format", "version"])
def test_save_refuses_meta_that_would_replace_a_reserved_key(tmp_path, key):
    # {format, version, model, **meta} let meta win: a checkpoint that could not load
    from sentdisc.errors import InputError

    with pytest.raises(InputError, match=f"reserved config.json key.*{key}"):
        save(tiny(), tmp_path / "ck", meta={key: "x"})
    assert not (tmp_path / "ck").exists()


def test_save_numpy_meta_as_numbers(tmp_path):
    d = save(tiny(), tmp_path / "ck", meta={"bpb": np.float32(2.5), "n": np.int64(3),
                                            "v": np.arange(2)},
             train_state={"iteration": np.int64(7)})
    meta = read_meta(d)
    assert meta["bpb"] == 2.5 and meta["n"] == 3 and meta["v"] == [0, 1]
    assert load_train_state(d) == {"iteration": 7}


def test_unwritable_meta_leaves_the_old_checkpoint_whole(tmp_path):
    old = tiny()
    d = save(old, tmp_path / "ck", meta={"note": "old"})
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    torch.manual_seed(1)
    new = ByteLM(ModelConfig(embed_size=8, rnn_size=32))
    with pytest.raises(TypeError, match="meta cannot be written as JSON: object"):
        save(new, d, meta={"note": object()})
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before  # no temp file either
    assert load(d).config == old.config


def test_a_failed_weights_write_leaves_the_old_file(tmp_path, monkeypatch):
    import sentdisc.checkpoint as ck

    d = save(tiny(), tmp_path / "ck")
    before = (d / "model.safetensors").read_bytes()

    def fail(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save(tiny(), d)
    assert (d / "model.safetensors").read_bytes() == before
    assert sorted(f.name for f in d.iterdir()) == ["config.json", "model.safetensors"]


def test_save_onto_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"cannot save a checkpoint to .*f: it is a file"):
        save(tiny(), tmp_path / "f")


def test_load_checks_map_location_first(tmp_path):
    from sentdisc.errors import InputError

    d = save(tiny(), tmp_path / "ck")
    with pytest.raises(InputError, match="map_location 'gpu' is not a torch device") as err:
        load(d, map_location="gpu")
    assert "unreadable" not in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            load(d, map_location="cuda")
    assert load(d, map_location=torch.device("cpu")).config == tiny().config


def test_unknown_config_field_names_the_path_once(tmp_path):
    d = save(tiny(), tmp_path / "ck")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"]["hidden"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown ModelConfig field") as err:
        load(d)
    assert str(err.value).count("config.json") == 1, str(err.value)
