"""Checkpoint I/O: the one format every job and the server read and write.

A checkpoint is a directory:
    model.safetensors     model weights
    config.json           {"format": "sentdisc", "version": 1, "model": ModelConfig, ...meta}
    optimizer.safetensors + optimizer.json   optional optimizer/scheduler state
    train_state.json      optional (iteration, data position, ...)
    classifier.json       optional: a fine-tuned checkpoint's classifier head
                          (``sentdisc.classifier``; serving and scoring take it by default)

Nothing is unpickled: tensors live in safetensors, everything else in JSON. OpenAI's released
sentiment-neuron weights (15 ``.npy`` files) load through ``load_openai``. A checkpoint may live
on any storage ``sentdisc.storage`` reads (``s3://bucket/run/checkpoint_final``): ``save`` writes
it locally and uploads it, ``load`` downloads it first.

The name ``openai`` (``--load_model openai``) stands for OpenAI's released mLSTM-4096 as
``sentdisc data fetch openai_weights`` leaves it in the default data dir: ``resolve`` turns it
into a folder, and ``load`` / ``load_config`` / ``read_meta`` call it, so every command that
takes a checkpoint takes the name.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sentdisc import storage
from sentdisc.data.registry import OPENAI_CHECKPOINT_DIR, OPENAI_WEIGHTS_DIR, npy_header, openai_shapes
from sentdisc.errors import InputError
from sentdisc.model import ByteLM, ModelConfig

FORMAT, VERSION = "sentdisc", 1
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
CLASSIFIER_FILE = "classifier.json"  # a fine-tuned checkpoint's head (sentdisc.classifier)
OPTIM_TENSORS, OPTIM_META, TRAIN_STATE = "optimizer.safetensors", "optimizer.json", "train_state.json"
OPENAI = "openai"  # the checkpoint name of OpenAI's released weights (see resolve)
# The unit of OpenAI's mLSTM-4096 that tracks sentiment (Radford et al. 2017; NVIDIA's README
# uses the same index): the heatmap's default neuron for --load_model openai.
OPENAI_SENTIMENT_NEURON = 2388


class CheckpointError(InputError):
    """A checkpoint that is missing, truncated or does not match its config."""


RESERVED_KEYS = ("format", "version", "model")  # config.json keys that meta may not set


def save(model: ByteLM, directory: str | os.PathLike, optimizer_state: Optional[dict] = None,
         train_state: Optional[dict] = None, meta: Optional[dict] = None) -> Path | str:
    """Write ``model`` (and optionally an optimizer/scheduler state tree and train state) to a
    local folder, or to a URI (written locally, then uploaded).

    ``meta``: more config.json keys (numpy scalars and arrays are written as numbers and
    lists); the reserved ``format``, ``version`` and ``model`` are refused. Every JSON file is
    serialized before anything is written, and each file is written beside its name and
    renamed into place: a bad meta value changes nothing, and a failed write leaves each file
    whole (the old one or the new)."""
    clash = sorted(set(meta or {}) & set(RESERVED_KEYS))
    if clash:
        raise InputError(f"checkpoint meta may not set the reserved config.json key(s) {clash}")
    config = {"format": FORMAT, "version": VERSION, "model": model_config(model).to_dict(),
              **(meta or {})}
    texts = {CONFIG_FILE: _json_text(config, "meta")}
    flat: dict[str, torch.Tensor] = {}
    if optimizer_state is not None:
        texts[OPTIM_META] = _json_text(_flatten_tensors(optimizer_state, "", flat),
                                       "optimizer_state")
    if train_state is not None:
        texts[TRAIN_STATE] = _json_text(train_state, "train_state")
    if storage.is_uri(directory):
        with tempfile.TemporaryDirectory() as tmp:
            save(model, tmp, optimizer_state, train_state, meta)
            return storage.upload(tmp, str(directory))
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {d}: it is a file, not a folder")
    d.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # DDP wrapper
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _save_tensors(tensors, d / MODEL_FILE)
    storage.write_text(str(d / CONFIG_FILE), texts[CONFIG_FILE])
    if optimizer_state is not None:
        _save_tensors(flat, d / OPTIM_TENSORS)
        storage.write_text(str(d / OPTIM_META), texts[OPTIM_META])
    if train_state is not None:
        storage.write_text(str(d / TRAIN_STATE), texts[TRAIN_STATE])
    return d


def model_config(model) -> ModelConfig:
    return getattr(model, "module", model).config


def _json_default(value):
    if isinstance(value, np.generic):  # np.float32(2.7) -> 2.7, np.bool_ -> bool
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} {str(value)[:80]!r} is not JSON-serializable")


def _json_text(obj: Any, what: str) -> str:
    """``obj`` as the JSON text ``storage.write_json`` writes, or a TypeError naming ``what``
    (before any file is touched)."""
    try:
        return json.dumps(obj, indent=2, default=_json_default)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} cannot be written as JSON: {e}") from None


def _save_tensors(tensors: dict, path: Path) -> None:
    """safetensors written beside ``path`` and renamed onto it (as ``storage.write_bytes``):
    a failure leaves the old file whole and no temporary behind."""
    tmp = storage.temp_beside(path)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_device(device, what: str = "map_location") -> torch.device:
    """``device`` as a torch device this machine has, or an InputError naming ``what`` (the
    argument or flag it came from) and saying why."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"{what} {device!r} is not a torch device "
                         "(e.g. 'cpu', 'cuda', 'cuda:0')") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what} {device!r}: CUDA is not available on this machine "
                             "(use 'cpu')")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"{what} {device!r}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type != "cpu":  # mps, xpu, ...: whether this machine has one
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, AssertionError) as e:
            raise InputError(f"{what} {device!r} is not available on this machine "
                             f"({str(e).splitlines()[0][:120]})") from None
    return parsed


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> ByteLM:
    """Checkpoint directory or URI (ours or OpenAI's 15 .npy files), or ``openai`` -> ByteLM
    in eval mode. ``map_location``: a torch device this machine has (checked first)."""
    check_device(map_location, "map_location")
    directory = resolve(directory)
    if storage.is_uri(directory):
        if not storage.is_dir(str(directory)):
            raise CheckpointError(f"checkpoint {directory} does not exist")
        with storage.local_dir(str(directory)) as local:
            return load(local, map_location)
    d = Path(directory)
    if not d.exists():
        raise CheckpointError(f"checkpoint {d} does not exist")
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d} is not a directory (expected {MODEL_FILE} + {CONFIG_FILE})")
    if is_openai_weights(d):
        return load_openai(d).to(map_location)
    config = load_config(d)
    weights_path = d / MODEL_FILE
    if not weights_path.exists():
        raise CheckpointError(f"{weights_path} is missing (checkpoint holds {storage.list_dir(str(d))})")
    try:
        tensors = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path} is unreadable or truncated: {e}") from None
    model = ByteLM(config).to(map_location)
    _load_matching(model, tensors, str(weights_path))
    return model.eval()


def is_openai_weights(directory: str | os.PathLike) -> bool:
    """A folder of OpenAI's released ``0.npy``..``14.npy`` rather than a sentdisc checkpoint."""
    d = str(directory)
    return storage.exists(storage.join(d, "0.npy")) and \
        not storage.exists(storage.join(d, MODEL_FILE))


def load_config(directory: str | os.PathLike) -> ModelConfig:
    directory = resolve(directory)
    if is_openai_weights(directory) and not storage.is_uri(directory):
        return openai_config(directory)
    path = storage.join(str(directory), CONFIG_FILE)
    if not storage.exists(path):
        raise CheckpointError(f"{path} is missing (checkpoint holds "
                              f"{storage.list_dir(str(directory))})")
    raw = storage.read_json(path, error=CheckpointError)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT \
            or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{path}: expected a sentdisc config with a 'model' object, "
                              f"got {str(raw)[:200]}")
    try:
        return ModelConfig.from_dict(raw["model"], source=str(path))
    except (TypeError, ValueError) as e:  # from_dict's messages start with the path already
        raise CheckpointError(str(e) if str(e).startswith(f"{path}:") else f"{path}: {e}") \
            from None


def read_meta(directory: str | os.PathLike) -> dict:
    """The whole config.json (model config plus whatever metadata the writer added)."""
    return storage.read_json(storage.join(str(resolve(directory)), CONFIG_FILE),
                             error=CheckpointError)


def load_optimizer_state(directory: str | os.PathLike) -> Optional[dict]:
    d = Path(directory)
    if not (d / OPTIM_META).exists():
        return None
    try:
        tensors = load_file(str(d / OPTIM_TENSORS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{d / OPTIM_TENSORS} is unreadable or truncated: {e}") from None
    return _unflatten_tensors(json.loads((d / OPTIM_META).read_text()), tensors)


def load_train_state(directory: str | os.PathLike) -> Optional[dict]:
    path = Path(directory) / TRAIN_STATE
    return json.loads(path.read_text()) if path.exists() else None


# --- which checkpoint to continue from -------------------------------------------------------

def incomplete_reason(directory: str | os.PathLike) -> Optional[str]:
    """Why a saved training checkpoint cannot be resumed (a file missing, a safetensors file
    cut short: a process killed while it was being written or uploaded), or None when it is
    whole. Reads only the JSON files and the safetensors headers."""
    d = str(directory)
    names = set(storage.list_dir(d))
    missing = [n for n in (MODEL_FILE, CONFIG_FILE, TRAIN_STATE) if n not in names]
    if OPTIM_META in names and OPTIM_TENSORS not in names:
        missing.append(OPTIM_TENSORS)
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        for name in (CONFIG_FILE, TRAIN_STATE) + ((OPTIM_META,) if OPTIM_META in names else ()):
            storage.read_json(storage.join(d, name), error=CheckpointError)
        for name in (MODEL_FILE,) + ((OPTIM_TENSORS,) if OPTIM_TENSORS in names else ()):
            check_safetensors(storage.join(d, name))
    except InputError as e:
        return str(e)
    return None


def check_safetensors(uri: str) -> None:
    """A safetensors file is 8 bytes of header length, the JSON header, then the tensors: the
    header says where the last tensor ends, so a truncated file shows without reading it."""
    fs, path = storage.filesystem(uri)
    size = fs.get_file_info(path).size
    with fs.open_input_file(path) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 < n < size else None
        except ValueError:  # bytes that are not JSON (UnicodeDecodeError is one)
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{uri}: not a safetensors file")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        # bool is an int to Python, not to safetensors
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            got = "missing" if offsets is None else repr(offsets)[:80]
            raise CheckpointError(f"{uri}: not a safetensors file (tensor {name!r}: "
                                  f"data_offsets {got}, expected [begin, end])")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise CheckpointError(f"{uri}: {size} bytes, its header describes {8 + n + end}")


def newest_complete(run_dir: str, log=print) -> Optional[str]:
    """The newest whole ``checkpoint_<iteration>*`` folder of a run (by iteration), saying why
    any newer one was passed over; None when there is none."""
    found = []
    for name in storage.list_dir(run_dir):
        digits = name[len("checkpoint_"):].split("_")[0]
        if name.startswith("checkpoint_") and digits.isdigit():
            found.append((int(digits), name))
    for _, name in sorted(found, reverse=True):
        path = storage.join(run_dir, name)
        reason = incomplete_reason(path)
        if reason is None:
            return path
        log(f"[pretrain] skipping {path}: incomplete ({reason})")
    return None


# --- OpenAI's released weights ---------------------------------------------------------------

def load_openai(directory: str | os.PathLike) -> ByteLM:
    """OpenAI's sentiment-neuron weights: ``0.npy``..``14.npy`` in their encoder's order.

    0 embedding [256,E]; 1 wx [E,4H]; 2-5 wh in four [H,H] pieces along axis 1; 6 wmx [E,H];
    7 wmh [H,H]; 8 b [4H]; 9 gx [4H]; 10 gh [4H]; 11 gmx [H]; 12 gmh [H]; 13 out w [H,256];
    14 out b [256] (``registry.openai_shapes``). Gates i, f, o, u; weight norm on all four
    matrices.
    """
    d = Path(directory)
    p = _read_openai_arrays(d)
    if p[0].ndim != 2 or p[0].shape[0] != 256:
        raise CheckpointError(f"{d / '0.npy'}: embedding must be [256, E], got {list(p[0].shape)}")
    if p[7].ndim != 2:
        raise CheckpointError(f"{d / '7.npy'}: wmh must be [H, H], got {list(p[7].shape)}")
    E, H = p[0].shape[1], p[7].shape[0]
    for i, shape in enumerate(openai_shapes(E, H)):
        if p[i].shape != shape:
            raise CheckpointError(f"{d / f'{i}.npy'}: expected shape {list(shape)} (E={E}, H={H}), "
                                  f"got {list(p[i].shape)}")
    model = ByteLM(_openai_model_config(E, H))
    layer = model.layers[0]
    t = torch.from_numpy
    with torch.no_grad():
        model.embed.weight.copy_(t(p[0]))
        for name, value in (("wx", p[1]), ("wh", np.concatenate(p[2:6], axis=1)), ("wmx", p[6]),
                            ("wmh", p[7]), ("b", p[8]), ("gx", p[9]), ("gh", p[10]),
                            ("gmx", p[11]), ("gmh", p[12])):
            getattr(layer, name).copy_(t(value))
        model.head.weight.copy_(t(p[13]).T)
        model.head.bias.copy_(t(p[14]))
    return model.eval()


def _read_openai_arrays(d: Path) -> list[np.ndarray]:
    if not d.is_dir():
        raise CheckpointError(f"OpenAI weights directory {d} does not exist")
    npys = sorted(p.name for p in d.glob("*.npy"))
    expected = [f"{i}.npy" for i in range(15)]
    if npys != sorted(expected):
        raise CheckpointError(f"{d}: expected the 15 files 0.npy..14.npy of OpenAI's encoder, "
                              f"found {len(npys)}: {npys[:20]}")
    arrays = []
    for name in expected:
        try:
            arrays.append(np.load(d / name, allow_pickle=False).astype(np.float32))
        except (ValueError, OSError, EOFError) as e:
            raise CheckpointError(f"{d / name} is not a readable .npy array: {e}") from None
    return arrays


def _openai_model_config(E: int, H: int) -> ModelConfig:
    return ModelConfig(embed_size=E, rnn_size=H, layers=1, rnn_type="mlstm", weight_norm="all")


def openai_config(directory: str | os.PathLike) -> ModelConfig:
    """The model config of an OpenAI weights folder, from two ``.npy`` headers (nothing
    loaded): E from the embedding, H from wmh."""
    d = Path(directory)
    try:
        (_, E), _ = npy_header(str(d / "0.npy"))
        (H, _), _ = npy_header(str(d / "7.npy"))
    except (InputError, OSError, ValueError) as e:
        raise CheckpointError(f"{d}: not OpenAI's weights layout ({e})") from None
    return _openai_model_config(E, H)


def convert_openai(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    return save(load_openai(src), dst, meta={"source": f"openai:{Path(src).name}"})


def ensure_openai_checkpoint(raw: str | os.PathLike, dst: str | os.PathLike, force: bool = False,
                             log=print) -> Path:
    """``dst`` converted from the weights in ``raw`` unless it is there already (``force``:
    convert anyway, after a fresh download). Written beside ``dst`` and renamed into place,
    so a killed conversion never leaves a half checkpoint under the name."""
    dst = Path(dst)
    if not force and (dst / MODEL_FILE).is_file() and (dst / CONFIG_FILE).is_file():
        return dst
    log(f"converting {raw} into the checkpoint {dst}")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_openai(raw, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def resolve(spec: str | os.PathLike, log=print) -> str | os.PathLike:
    """A checkpoint argument -> what to read: ``openai`` becomes ``<data dir>/openai_checkpoint``
    (the default data dir, ``sentdisc.config.default_data_dir()``, where ``sentdisc data fetch
    openai_weights`` writes), converted from ``<data dir>/openai_weights`` first when only the
    15 ``.npy`` files are there (or those files themselves when the data dir is read-only).
    Anything else is returned as it is. Neither there: a CheckpointError with the command."""
    if str(spec) != OPENAI:
        return spec
    from sentdisc.config import default_data_dir
    from sentdisc.data.fetch import fetch_command

    root = default_data_dir()
    ckpt, raw = root / OPENAI_CHECKPOINT_DIR, root / OPENAI_WEIGHTS_DIR
    if (ckpt / MODEL_FILE).is_file() and (ckpt / CONFIG_FILE).is_file():
        return ckpt
    missing = [f"{i}.npy" for i in range(15) if not (raw / f"{i}.npy").is_file()]
    if not missing:
        try:
            return ensure_openai_checkpoint(raw, ckpt, log=log)
        except OSError as e:  # a read-only data dir: read the .npy files each time instead
            log(f"cannot write {ckpt} ({e}): loading {raw} directly")
            return raw
    has = f"{raw} lacks {', '.join(missing)}" if raw.is_dir() else f"there is no {raw}"
    raise CheckpointError(f"checkpoint {OPENAI!r}: OpenAI's weights are not in {root} (no {ckpt}, "
                          f"and {has}). Run `{fetch_command(OPENAI_WEIGHTS_DIR, root)}` "
                          f"(15 files, ~345 MB, converted into {ckpt})")


# --- helpers ---------------------------------------------------------------------------------

def _load_matching(model: ByteLM, tensors: dict, where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {list(tensors[k].shape)}, config expects {list(v.shape)}"
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected}")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong))
        raise CheckpointError(f"{where} does not match its config.json: " + ", ".join(parts))
    # a diverged run's weights would answer every text with NaN, which no label can mean
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}): the run that saved it had "
                              "diverged; use an earlier checkpoint")
    model.load_state_dict(tensors)


def _flatten_tensors(obj: Any, prefix: str, out: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        key = prefix or "_"
        out[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k), out)]
                             for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten_tensors(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]
    return obj


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def _unflatten_tensors(tree: Any, tensors: dict) -> Any:
    if isinstance(tree, dict) and "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict) and "__dict__" in tree:
        return {(k["int"] if isinstance(k, dict) else k): _unflatten_tensors(v, tensors)
                for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [_unflatten_tensors(v, tensors) for v in tree]
    return tree
