"""Heatmap of one neuron over a text, or text generated with that neuron held at a value.

    sentdisc heatmap  --load_model CKPT --text "This movie was great" --classifier classifier.json
    sentdisc generate --load_model CKPT --classifier classifier.json --overwrite 1 --seq_length 200
    python jobs/visualize.py --load_model CKPT --text ... [--generate]   (same code, one script)

Flags as in NVIDIA's sentiment-discovery ``visualize.py`` (text, neuron, layer, generate,
seq_length, temperature, overwrite, negate, load_model). With ``--classifier`` (the transfer
step's classifier.json) the neuron, layer, state and sign come from its ``Probe``: the neuron
defaults to its top neuron (``--label L``: the one that stands for label L of a multi-class
or multi-label classifier), and a top neuron with a negative weight is negated (green =
positive sentiment, or label L) unless ``--no-negate`` says otherwise. Without
``--classifier``, a fine-tuned checkpoint's own classifier.json is used (as ``sentdisc score``
and ``sentdisc serve`` do). ``--text_file`` is read as UTF-8 (a leading byte-order mark
dropped). Files go to <experiment_dir>/<experiment_name>/heatmaps/, named by
``safe_filename``.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from sentdisc import storage, viz
from sentdisc.config import OutputConfig, build_parser, parse
from sentdisc.errors import InputError
from sentdisc.probe import TRACE_KINDS, Probe
from sentdisc.recipes import run as run_recipe
from sentdisc.text import END_PAD, FRONT_PAD, preprocess

FORMATS = ("png", "svg", "html", "json")


@dataclass
class VisualizeConfig:
    load_model: str = field(default="", metadata={
        "help": "checkpoint directory, or openai (defaults to the classifier's checkpoint)",
        "path": True})
    text: str = field(default="The meaning of life is ", metadata={
        "help": "text to analyse, or the prompt to continue with --generate"})
    text_file: str = field(default="", metadata={
        "help": "read the text from this UTF-8 file instead", "path": True})
    neuron: int | None = field(default=None, metadata={
        "help": "neuron to show (default: the classifier's top neuron; 2388 for --load_model "
                "openai; else 0)"})
    classifier: str = field(default="", metadata={
        "help": "transfer classifier.json: its top neuron, sign, layer and feature kind",
        "path": True})
    label: str = field(default="", metadata={
        "help": "a multi-class or multi-label classifier's label: show the neuron that stands "
                "for it (its largest weight for that label), signed toward the label (instead "
                "of --neuron)"})
    layer: int | None = field(default=None, metadata={
        "help": "layer to read (default: the classifier's, else -1 = last)"})
    kind: str | None = field(default=None, metadata={
        "help": "cell or hidden (default: cell; hidden for a classifier on hidden/mean/max features)"})
    generate: bool = field(default=False, metadata={
        "help": "continue --text by seq_length bytes instead of analysing it"})
    seq_length: int = field(default=256, metadata={"help": "bytes to generate after the prompt"})
    temperature: float = field(default=0.4, metadata={"help": "sampling temperature (0 = greedy)"})
    overwrite: float | None = field(default=None, metadata={
        "help": "hold the neuron's cell at this value while generating (+1/-1; 0 = don't)"})
    negate: bool | None = field(default=None, metadata={
        "help": "the neuron is a negative-sentiment neuron: flip its sign (default: from the classifier)"})
    seed: int | None = field(default=1234, metadata={"help": "sampling seed (reproducible text)"})
    width: int = field(default=viz.DEFAULT_WIDTH, metadata={"help": "characters per heatmap line"})
    formats: list[str] = field(default_factory=lambda: ["png"], metadata={
        "help": f"files to write, any of {','.join(FORMATS)}"})
    device: str = field(default="cpu", metadata={"help": "torch device for the model (cpu, cuda)"})


def resolve(cfg: VisualizeConfig) -> VisualizeConfig:
    """Fill neuron / layer / kind / negate / load_model from the classifier's probe where not
    given (the checkpoint's own classifier.json when --classifier is not given), read
    --text_file, and check --device."""
    from sentdisc.checkpoint import OPENAI, OPENAI_SENTIMENT_NEURON, check_device

    check_device(cfg.device, "--device")
    if not cfg.classifier and cfg.load_model and cfg.load_model != OPENAI:
        from sentdisc.serving.args import own_classifier  # as score and serve find it

        cfg = replace(cfg, classifier=own_classifier(cfg.load_model) or "")
    probe = Probe.load(cfg.classifier) if cfg.classifier else Probe()
    if cfg.label:
        if not cfg.classifier:
            raise InputError("--label needs --classifier: the classifier names each label's "
                             "neurons")
        if cfg.neuron is not None:
            raise InputError("give --neuron or --label, not both")
        probe = probe.for_label(cfg.label)
    ckpt = cfg.load_model or probe.checkpoint
    # OpenAI's model without a classifier: its known sentiment unit rather than unit 0.
    known = OPENAI_SENTIMENT_NEURON if ckpt == OPENAI and not cfg.classifier else 0
    neuron = cfg.neuron if cfg.neuron is not None else (probe.neuron or known)
    kind = cfg.kind or (probe.trace_kind if cfg.classifier else "cell")
    if not ckpt:
        raise InputError("--load_model is required (a checkpoint directory), unless the "
                         "classifier names its checkpoint")
    text = cfg.text
    if cfg.text_file:
        try:
            text = storage.read_text(cfg.text_file)
        except (InputError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --text_file {cfg.text_file}: {e}") from None
        text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    bad = sorted(set(cfg.formats) - set(FORMATS))
    if bad or not cfg.formats:
        raise InputError(f"--formats must be a comma list of {','.join(FORMATS)}, "
                         f"got {cfg.formats}")
    if kind not in TRACE_KINDS:
        raise InputError(f"--kind must be cell or hidden, got {kind!r}")
    if cfg.overwrite is not None and not math.isfinite(cfg.overwrite):
        raise InputError(f"--overwrite must be a finite number, got {cfg.overwrite}")
    # checked before the model runs: a trace keeps every byte's states (32 KB a byte at the
    # OpenAI model's size), so a 1 MB text would fill the memory before the renderer refused it.
    # Counted as drawn: the cleaned text, without the pads the user did not write.
    chars = len(preprocess(text or "")) - len(FRONT_PAD) - len(END_PAD) \
        + (cfg.seq_length if cfg.generate else 0)
    if chars > viz.MAX_CHARS:
        raise InputError(f"{chars} characters{' with --seq_length' if cfg.generate else ''} is "
                         f"too many to draw (at most {viz.MAX_CHARS})")
    negate = probe.negate(neuron) if cfg.negate is None else cfg.negate
    return replace(cfg, neuron=neuron, layer=probe.layer if cfg.layer is None else cfg.layer,
                   kind=kind, negate=negate, load_model=ckpt, text=text, text_file="")


def trace(cfg: VisualizeConfig, model) -> dict:
    """The resolved config's characters and values, with the title, label and file suffix."""
    sign = " (negated)" if cfg.negate else ""
    neg = "_neg" if cfg.negate else ""
    of = f", label {cfg.label}" if cfg.label else ""
    if not cfg.generate:
        chars, values = viz.neuron_values(model, cfg.text, cfg.neuron, cfg.layer, cfg.kind,
                                          negate=cfg.negate)
        return {"chars": chars, "values": values, "prompt_end": None, "generated": None,
                "title": f"neuron {cfg.neuron}{sign}{of} ({cfg.kind}, layer {cfg.layer})",
                "label": f"neuron {cfg.neuron}{sign}, {cfg.kind}, layer {cfg.layer}",
                "suffix": f"_n{cfg.neuron}_l{cfg.layer}_{cfg.kind}{neg}"}
    out = viz.generate_text(model, cfg.text, cfg.seq_length, cfg.temperature, neuron=cfg.neuron,
                            overwrite=cfg.overwrite, negate=cfg.negate, layer=cfg.layer,
                            seed=cfg.seed)
    held = f"held at {cfg.overwrite:+g}" if out["forced"] is not None else "free"
    return {"chars": out["chars"], "values": out["values"], "prompt_end": out["prompt_end"],
            "generated": out,
            "title": f"generated, neuron {cfg.neuron}{of} {held}, T={cfg.temperature:g}, "
                     f"seed {cfg.seed}",
            "label": f"neuron {cfg.neuron}{sign}, cell, layer {cfg.layer}",  # generation reads cells
            "suffix": f"_gen_n{cfg.neuron}_l{cfg.layer}_o{cfg.overwrite or 0:g}{neg}"
                      f"_t{cfg.temperature:g}_s{cfg.seed}"}


def render(cfg: VisualizeConfig, t: dict, fmt: str) -> bytes:
    """One output file's content."""
    chars, values, end = t["chars"], t["values"], t["prompt_end"]
    if fmt == "png":
        return viz.render_png(chars, values, end, title=t["title"], width=cfg.width,
                              label=t["label"])
    if fmt == "svg":
        text = viz.render_svg(chars, values, end, title=t["title"], width=cfg.width,
                              label=t["label"])
    elif fmt == "html":
        text = viz.render_html(chars, values, end, title=t["title"], label=t["label"])
    else:
        record = {"text": "".join(chars), "neuron": cfg.neuron, "label": cfg.label or None,
                  "layer": cfg.layer,
                  "kind": "cell" if cfg.generate else cfg.kind, "negate": cfg.negate,
                  "checkpoint": cfg.load_model, "prompt_end": end,
                  "chars": chars, "values": [float(v) for v in values]}
        if t["generated"] is not None:
            record.update(overwrite=cfg.overwrite, temperature=cfg.temperature, seed=cfg.seed,
                          seq_length=cfg.seq_length)
        text = json.dumps(record, ensure_ascii=False)
    return text.encode("utf-8")


def run(cfg: VisualizeConfig, out: OutputConfig | None = None) -> dict:
    """Config -> files written. Returns {'paths': [...], 'chars', 'values', 'generated', ...}."""
    from sentdisc.checkpoint import load

    cfg, out = resolve(cfg), out or OutputConfig()
    t = trace(cfg, load(cfg.load_model, map_location=cfg.device))
    folder = storage.join(out.run_dir, "heatmaps")
    paths = []
    for fmt in cfg.formats:
        name = safe_filename(cfg.text, f"{t['suffix']}.{fmt}")
        # On a local disk a symlink could sit at the name; an object store has none.
        path = storage.join(folder, name) if storage.is_uri(folder) else \
            contained_path(folder, name)
        storage.write_bytes(str(path), render(cfg, t, fmt))
        paths.append(path)
    return {"paths": paths, "chars": t["chars"], "values": t["values"],
            "prompt_end": t["prompt_end"], "config": cfg, "generated": t["generated"]}


def main(argv=None, generate: bool | None = None, prog: str = "visualize") -> int:
    """One script for both: ``--generate`` switches to generation (``generate=True`` forces
    it). Prints the files written; returns the exit status (2 on bad input)."""
    parser = build_parser(__doc__.splitlines()[0], VisualizeConfig, OutputConfig)
    parser.prog = prog
    cfg, out = parse([VisualizeConfig, OutputConfig], argv, parser=parser)
    if generate is not None:
        cfg = replace(cfg, generate=generate)

    def body():
        result = run(cfg, out)
        if result["generated"] is not None:
            print(f"generated: {result['generated']['generated']!r}")
        for p in result["paths"]:
            print(p)
    return run_recipe(prog, body)


def heatmap_main(argv=None) -> int:
    return main(argv, prog="sentdisc heatmap")


def generate_main(argv=None) -> int:
    return main(argv, generate=True, prog="sentdisc generate")


# --- file names ------------------------------------------------------------------------------

_SUFFIX = re.compile(r"[A-Za-z0-9_.+=-]{1,100}")


def safe_filename(text: str, suffix: str = ".png", slug_chars: int = 40) -> str:
    """A file name for ``text``: a short ASCII slug of it plus a hash of the whole text.

    The text never becomes a path: only [a-z0-9-] survive into the slug (no '/', '..', NUL,
    no non-ASCII), it is cut to ``slug_chars``, and the hash keeps different texts with the
    same slug apart. ``suffix`` is chosen by code, not users, and must be a plain name part.
    """
    if not isinstance(suffix, str) or not _SUFFIX.fullmatch(suffix):
        raise InputError(f"suffix must match {_SUFFIX.pattern}, got {suffix!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower())[:slug_chars].strip("-") or "text"
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:12]
    return f"{slug}-{digest}{suffix}"


def contained_path(directory: str | Path, name: str) -> Path:
    """``directory / name``, refusing anything that would resolve outside ``directory``
    (a separator in the name, a symlink already sitting at that name, ...)."""
    base = Path(directory).resolve()
    if not name or "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
        raise InputError(f"not a plain file name: {name!r}")
    path = (base / name).resolve()
    if path.parent != base:
        raise InputError(f"{name!r} would be written outside {base}")
    return path


if __name__ == "__main__":
    sys.exit(main())
