import numpy as np
import pyarrow as pa

from sentdisc.text import decode, encode, encode_batch, encode_list, preprocess


def test_preprocess_matches_openai_encoder():
    # OpenAI's utils.preprocess: unescape, newlines -> spaces, strip, pad "\n " ... " ".
    assert preprocess("  Great &amp; cheap!\nWould buy\n ") == "\n Great & cheap! Would buy "
    assert preprocess("") == "\n  "


def test_transliterate():
    assert preprocess("café “quoted”", transliterate=True) == '\n cafe "quoted" '
    assert preprocess("café") == "\n café "


def test_batch_equals_single_and_is_utf8():
    texts = ["plain", "multi\nline &lt;b&gt;", "", "naïve ☃ 日本", "  padded  ", "x" * 5000]
    flat, offsets = encode_batch(texts)
    assert flat.dtype == np.uint8 and offsets.dtype == np.int64 and len(offsets) == len(texts) + 1
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(flat[offsets[i]:offsets[i + 1]], encode(t))
        assert decode(flat[offsets[i]:offsets[i + 1]]) == preprocess(t)
    assert [len(e) for e in encode_list(texts)] == [len(encode(t)) for t in texts]


def test_batch_accepts_arrow_and_sliced_arrays():
    arr = pa.array(["zero", "one &amp; two", "three"]).slice(1)
    flat, offsets = encode_batch(arr)
    assert decode(flat[offsets[0]:offsets[1]]) == "\n one & two "
    assert decode(flat[offsets[1]:offsets[2]]) == "\n three "


def test_empty_batch():
    flat, offsets = encode_batch([])
    assert len(flat) == 0 and list(offsets) == [0]


def test_decode_replaces_invalid_utf8():
    assert decode(np.array([0x61, 0xFF, 0x62], np.uint8)) == "a\ufffdb"
