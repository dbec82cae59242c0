import numpy as np
import pytest
import torch

from sentdisc import ByteLM, ModelConfig, featurize


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ByteLM(ModelConfig(embed_size=8, rnn_size=24, layers=2, weight_norm="all")).eval()


TEXTS = ["great movie", "", "awful, just awful &amp; boring", "é ☃", "mixed\nlines here",
         "a" * 700, "short", "medium length review text"]


@pytest.mark.parametrize("kind", ["cell", "hidden", "mean", "max"])
@pytest.mark.parametrize("layer", [0, -1])
def test_batched_equals_one_at_a_time(model, kind, layer):
    batched = featurize(model, TEXTS, batch_size=3, kind=kind, layer=layer, chunk_size=64)
    alone = np.concatenate([featurize(model, [t], batch_size=1, kind=kind, layer=layer,
                                      chunk_size=10_000) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 24) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_cell_feature_is_state_after_last_byte(model):
    from sentdisc.text import encode

    text = "the final state"
    x = torch.from_numpy(encode(text).astype(np.int64))[None]
    _, state = model(x)
    feat = featurize(model, [text, "much longer padding partner " * 5])
    np.testing.assert_allclose(feat[0], state[-1][1][0].detach().numpy(), atol=1e-5)
    mean = featurize(model, [text], kind="mean")
    hs = model.trace(x, kind="hidden")[0].numpy()
    np.testing.assert_allclose(mean[0], hs.mean(0), atol=1e-5)


def test_order_kept_and_chunking_invariant(model):
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abc de!"), size=int(n))) for n in rng.integers(0, 300, 20)]
    a = featurize(model, texts, batch_size=4, chunk_size=7)
    b = featurize(model, texts, batch_size=20, chunk_size=1000)
    np.testing.assert_allclose(a, b, atol=1e-5)
    perm = rng.permutation(len(texts))
    c = featurize(model, [texts[i] for i in perm], batch_size=4)
    np.testing.assert_allclose(c, a[perm], atol=1e-5)


def test_very_long_text_in_chunks(model):
    long_text = "lorem ipsum " * 3000  # 36 KB: 141 chunks of 256 with carried state
    done = []
    f = featurize(model, [long_text, "x"], progress=lambda d, n: done.append((d, n)))
    assert np.isfinite(f).all() and done[-1] == (2, 2)
    g = featurize(model, [long_text], chunk_size=4096)
    np.testing.assert_allclose(f[:1], g, atol=1e-5)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="kind"):
        featurize(model, ["x"], kind="last")
    with pytest.raises(ValueError, match="layer"):
        featurize(model, ["x"], layer=5)
    with pytest.raises(TypeError, match="list of texts"):
        featurize(model, "a string")
    assert featurize(model, []).shape == (0, 24)


def test_model_mode_restored(model):
    model.train()
    featurize(model, ["x"])
    assert model.training
    model.eval()


def test_several_kinds_in_one_pass(model):
    both = featurize(model, TEXTS, kind=["cell", "mean"], batch_size=3)
    np.testing.assert_allclose(both["cell"], featurize(model, TEXTS, kind="cell"), atol=1e-6)
    np.testing.assert_allclose(both["mean"], featurize(model, TEXTS, kind="mean"), atol=1e-6)


def test_a_pool_shrunk_while_it_runs_keeps_its_rows_and_admits_none_until_under(model):
    """The pool asks its size before every admission (a server retunes a running pool)."""
    from sentdisc.features import _chunk_runner, featurize_pool
    from sentdisc.text import encode_list

    texts = [f"review {i} " * (3 + 5 * i % 17) for i in range(20)]
    size, rows = [8], []
    eager = _chunk_runner(model, 1, ["cell"], 32, np.array([32]), 8, "fp32", "off")

    def run(x, state, m):
        rows.append(len(x))
        if len(rows) == 4:
            size[0] = 2
        return eager(x, state, m)

    got = np.zeros((len(texts), 24), np.float32)
    with torch.inference_mode():
        for idx, feats in featurize_pool(model, encode_list(texts), iter(range(len(texts))),
                                         lambda: size[0], 1, ["cell"], 32, run):
            got[idx] = feats["cell"]
    assert rows[:4] == [8] * 4
    after = rows[3:]  # from the chunk before the first admission under the new size
    assert all(b <= max(a, 2) for a, b in zip(after, after[1:])), after
    assert after.count(2) > 5, after  # and once under it, texts joined again
    np.testing.assert_allclose(got, featurize(model, texts, precision="fp32"), atol=1e-5)


@pytest.mark.parametrize("texts, message", [
    (["a", None], r"texts\[1\] is None, not str"),
    (["a", 5], r"texts\[1\] is int, not str"),
    (["a", float("nan")], r"texts\[1\] is NaN"),
    (["a", b"bytes"], r"texts\[1\] is bytes, not str"),
    (np.array(["a", "b", None], dtype=object), r"texts\[2\] is None"),
])
def test_texts_that_are_not_str_are_refused_by_index(model, texts, message):
    # A None used to become an empty text with made-up features (cell zeros, mean NaN, max
    # -inf) that a classifier then labelled; a number failed deep inside Arrow.
    from sentdisc.errors import InputError

    with pytest.raises(TypeError, match=message) as err:
        featurize(model, texts)
    assert isinstance(err.value, InputError)  # one line, exit 2 from a command


def test_pandas_series_with_a_missing_value_is_refused(model):
    pd = pytest.importorskip("pandas")
    with pytest.raises(TypeError, match=r"texts\[1\] is NaN"):
        featurize(model, pd.Series(["good", float("nan"), "bad"]))


def test_unpaired_surrogate_names_the_text(model):
    from sentdisc.errors import InputError
    from sentdisc.text import encode, encode_batch

    with pytest.raises(InputError, match=r"texts\[1\] holds characters that are not valid Unicode"):
        featurize(model, ["fine", "a\ud800"])
    with pytest.raises(InputError, match=r"texts\[0\]"):
        encode_batch(["\udfff"])
    with pytest.raises(InputError, match="not valid Unicode"):
        encode("a\ud800")


def test_arrow_nulls_are_refused():
    import pyarrow as pa

    from sentdisc.text import encode_batch

    with pytest.raises(TypeError, match=r"texts\[1\] is None"):
        encode_batch(pa.array(["a", None], pa.large_string()))


def test_decode_takes_bytes_as_generate_returns_them():
    from sentdisc import decode

    assert decode(b"abc") == "abc"
    assert decode(bytearray(b"\xc3\xa9")) == "é"
    assert decode(memoryview(b"a\xffb")) == "a\ufffdb"
    assert decode(np.array([104, 105], np.uint8)) == "hi"
    assert decode([104, 105]) == "hi"
