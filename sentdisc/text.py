"""Text -> bytes: the one preprocessing used by training, transfer, heatmaps and serving.

Matches OpenAI's released encoder (``utils.preprocess``): HTML-unescape, newlines to spaces,
strip, then pad with a leading "\\n " and a trailing " " so every sample starts and ends the way
the model saw during pretraining. The batch path runs on Arrow buffers, so the per-character
work (replace, trim, pad, UTF-8 encode) happens in C++ rather than a Python loop.

Every text must be a ``str`` that UTF-8 can encode: a ``None``, a number (a pandas NaN), bytes
or an unpaired surrogate is refused with an error naming its index (``texts[1] is None, not
str``), never encoded as an empty or made-up text.
"""
from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentdisc.errors import InputError

FRONT_PAD = "\n "
END_PAD = " "


class TextTypeError(InputError, TypeError):
    """An item of a batch of texts that is not a str (None, a number, bytes): an InputError
    (one line, exit 2 from a command) that is also the TypeError a library caller expects."""


def encode_utf8(s: str, what: str = "text") -> bytes:
    """``s`` as UTF-8; an unpaired surrogate (which UTF-8 cannot encode) is an InputError
    naming ``what`` rather than a raw UnicodeEncodeError."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} holds characters that are not valid Unicode "
                         "(unpaired surrogates); it cannot be encoded as UTF-8") from None


def _describe(item) -> str:
    if item is None:
        return "None"
    if isinstance(item, float) and item != item:
        return "NaN (a missing value)"
    return type(item).__name__


def check_texts(texts: Sequence, name: str = "texts") -> None:
    """Raise for the first item of ``texts`` that is not a str (``TextTypeError``) or holds an
    unpaired surrogate (``InputError``), naming its index: ``texts[1] is None, not str``."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TextTypeError(f"{name}[{i}] is {_describe(t)}, not str")
    for i, t in enumerate(texts):
        encode_utf8(t, f"{name}[{i}]")


def preprocess(text: str, transliterate: bool = False) -> str:
    """Clean one text exactly as ``encode_batch`` does, returning the padded string."""
    if "&" in text:
        text = html.unescape(text)
    if transliterate:
        from unidecode import unidecode

        text = unidecode(text)
    return FRONT_PAD + text.replace("\n", " ").strip() + END_PAD


def is_blank(text: str) -> bool:
    """Nothing left once preprocessed (whitespace, or entities of it such as ``&nbsp;``): the
    model would read only its pads, and there is no heatmap to draw."""
    return preprocess(text) == FRONT_PAD + END_PAD


def encode(text: str, transliterate: bool = False) -> np.ndarray:
    """One text -> uint8 array of its preprocessed UTF-8 bytes."""
    if not isinstance(text, str):
        raise TextTypeError(f"text is {_describe(text)}, not str")
    return np.frombuffer(encode_utf8(preprocess(text, transliterate)), dtype=np.uint8)


def _as_string_array(texts: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Texts as an Arrow large_string array. Python texts are checked item by item
    (``check_texts``): Arrow would take a None as a null (later an empty text) and fail deep
    inside on a number or a surrogate. A null in an Arrow array is refused the same way."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    if not isinstance(texts, pa.Array):
        items = texts if isinstance(texts, (list, np.ndarray)) else list(texts)
        if not _all_str(items):
            check_texts(items)
        try:
            texts = pa.array(items, type=pa.large_string())
        except UnicodeEncodeError:
            check_texts(items)  # names the text with the surrogate
            raise
    if pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type):
        texts = texts.cast(pa.large_string())  # raises on invalid UTF-8: callers filter first
    if texts.null_count:
        first = int(np.flatnonzero(texts.is_null().to_numpy(zero_copy_only=False))[0])
        raise TextTypeError(f"texts[{first}] is None (a null), not str")
    return texts.cast(pa.large_string())


def _all_str(items) -> bool:
    if isinstance(items, np.ndarray) and items.dtype.kind == "U":
        return True
    return all(isinstance(t, str) for t in items)


def preprocess_batch(texts: Sequence[str] | pa.Array, transliterate: bool = False) -> pa.Array:
    """Vectorised ``preprocess`` over many texts: returns an Arrow large_string array."""
    arr = _as_string_array(texts)
    if len(arr) == 0:
        return arr
    # html.unescape has no Arrow kernel; only texts holding '&' can change, so only they pay.
    has_amp = pc.match_substring(arr, "&").to_numpy(zero_copy_only=False)
    if has_amp.any() or transliterate:
        py = arr.to_pylist()
        if transliterate:
            from unidecode import unidecode
        for i in range(len(py)):
            if py[i] is None:
                continue
            if has_amp[i]:
                py[i] = html.unescape(py[i])
            if transliterate:
                py[i] = unidecode(py[i])
        arr = pa.array(py, type=pa.large_string())
    arr = pc.replace_substring(arr, "\n", " ")
    arr = pc.utf8_trim_whitespace(arr)
    pad = lambda s: pa.scalar(s, pa.large_string())
    return pc.binary_join_element_wise(pad(FRONT_PAD), arr, pad(END_PAD), pad(""))


def encode_batch(texts: Sequence[str] | pa.Array, transliterate: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Many texts -> (flat uint8 bytes, int64 offsets of length N+1), zero-copy from Arrow.

    Text i is ``flat[offsets[i]:offsets[i+1]]``.
    """
    arr = preprocess_batch(texts, transliterate).cast(pa.large_binary())
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int64)
    arr = pa.concat_arrays([arr])  # normalise slicing offsets
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64, count=n + 1, offset=arr.offset * 8)
    start = int(offsets[0])
    flat = (np.frombuffer(data_buf, dtype=np.uint8)[start:int(offsets[-1])]
            if data_buf is not None else np.zeros(0, np.uint8))
    return flat, offsets - start


def encode_list(texts: Sequence[str], transliterate: bool = False) -> list[np.ndarray]:
    """Many texts -> list of per-text uint8 arrays (views into one buffer)."""
    flat, offsets = encode_batch(texts, transliterate)
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def decode(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """Bytes the model produced (``ByteLM.generate`` returns bytes; a uint8 array or a list
    of byte values also do) -> text; invalid UTF-8 (possible when sampling) is replaced."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    return bytes(np.asarray(data, dtype=np.uint8)).decode("utf-8", errors="replace")
