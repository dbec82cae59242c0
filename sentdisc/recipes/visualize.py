"""Heatmap of one neuron over a text, or text generated with that neuron held at a value.

    sentdisc heatmap  --load_model CKPT --text "This movie was great" --classifier classifier.json
    sentdisc generate --load_model CKPT --classifier classifier.json --overwrite 1 --seq_length 200
    python jobs/visualize.py --load_model CKPT --text ... [--generate]   (same code, one script)

Flags as in NVIDIA's sentiment-discovery ``visualize.py`` (text, neuron, layer, generate,
seq_length, temperature, overwrite, negate, load_model). With ``--classifier`` (the transfer
step's classifier.json) the neuron defaults to its top neuron, and a neuron with a negative
weight is negated (green = positive sentiment) unless ``--no-negate`` says otherwise.
Files go to <experiment_dir>/<experiment_name>/heatmaps/, named by ``viz.safe_filename``.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from sentdisc import viz
from sentdisc.checkpoint import CheckpointError, load
from sentdisc.config import build_parser, parse

FORMATS = ("png", "svg", "html", "json")


@dataclass
class VisualizeConfig:
    load_model: str = field(default="", metadata={
        "help": "checkpoint directory (defaults to the classifier's checkpoint)"})
    text: str = field(default="The meaning of life is ", metadata={
        "help": "text to analyse, or the prompt to continue with --generate"})
    text_file: str = field(default="", metadata={"help": "read the text from this UTF-8 file instead"})
    neuron: int | None = field(default=None, metadata={
        "help": "neuron to show (default: the classifier's top neuron, else 0)"})
    classifier: str = field(default="", metadata={
        "help": "transfer classifier.json: its top neuron, sign, layer and feature kind"})
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
    experiment_dir: str = field(default="experiments", metadata={"help": "root of all outputs"})
    experiment_name: str = field(default="default", metadata={"help": "this experiment's folder"})


class UsageError(ValueError):
    """A problem with the command's input, reported as one line (no traceback)."""


def read_classifier(path: str) -> dict:
    """The fields of a transfer classifier.json this tool needs: top neuron, its sign, and the
    layer / feature kind it was trained on (read by the one Classifier loader; no pickle)."""
    from sentdisc.classifier import Classifier, ClassifierError

    try:
        clf = Classifier.load(path)
    except ClassifierError as e:
        raise UsageError(str(e)) from None
    return {"neurons": clf.neurons, "signs": clf.signs, "layer": clf.layer,
            "kind": "cell" if clf.feature_kind == "cell" else "hidden",
            "checkpoint": clf.checkpoint}


def resolve(cfg: VisualizeConfig) -> VisualizeConfig:
    """Fill neuron / layer / kind / negate / load_model from the classifier where not given."""
    clf = read_classifier(cfg.classifier) if cfg.classifier else None
    neuron, layer, kind, negate, ckpt = cfg.neuron, cfg.layer, cfg.kind, cfg.negate, cfg.load_model
    if clf:
        if neuron is None:
            neuron = clf["neurons"][0]
        if negate is None and neuron in clf["neurons"]:
            # A neuron whose weight is negative reads "negative sentiment" when large: flip
            # it so green is positive and --overwrite 1 means positive.
            negate = clf["signs"][clf["neurons"].index(neuron)] < 0
        layer = clf["layer"] if layer is None else layer
        kind = clf["kind"] if kind is None else kind
        ckpt = ckpt or clf["checkpoint"]
    if not ckpt:
        raise UsageError("--load_model is required (a checkpoint directory), unless the "
                         "classifier names its checkpoint")
    if cfg.text_file:
        try:
            text = Path(cfg.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --text_file {cfg.text_file}: {e}") from None
    else:
        text = cfg.text
    bad = sorted(set(cfg.formats) - set(FORMATS))
    if bad or not cfg.formats:
        raise UsageError(f"--formats must be a comma list of {','.join(FORMATS)}, got {cfg.formats}")
    name = cfg.experiment_name
    if not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise UsageError(f"--experiment_name must be a plain folder name, got {name!r}")
    if (kind or "cell") not in ("cell", "hidden"):
        raise UsageError(f"--kind must be cell or hidden, got {kind!r}")
    if cfg.overwrite is not None and not math.isfinite(cfg.overwrite):
        raise UsageError(f"--overwrite must be a finite number, got {cfg.overwrite}")
    return replace(cfg, neuron=0 if neuron is None else neuron,
                   layer=-1 if layer is None else layer, kind=kind or "cell",
                   negate=bool(negate), load_model=ckpt, text=text, text_file="")


def run(cfg: VisualizeConfig) -> dict:
    """Resolved config -> files written. Returns {'paths': [...], 'chars', 'values', ...}."""
    cfg = resolve(cfg)
    model = load(cfg.load_model, map_location=cfg.device)
    sign = " (negated)" if cfg.negate else ""
    label = f"neuron {cfg.neuron}{sign}, {cfg.kind}, layer {cfg.layer}"
    if cfg.generate:
        out = viz.generate_text(model, cfg.text, cfg.seq_length, cfg.temperature,
                                neuron=cfg.neuron, overwrite=cfg.overwrite, negate=cfg.negate,
                                layer=cfg.layer, seed=cfg.seed)
        chars, values, prompt_end = out["chars"], out["values"], out["prompt_end"]
        held = f"held at {cfg.overwrite:+g}" if out["forced"] is not None else "free"
        title = f"generated, neuron {cfg.neuron} {held}, T={cfg.temperature:g}, seed {cfg.seed}"
        label = f"neuron {cfg.neuron}{sign}, cell, layer {cfg.layer}"  # generation reads cells
        suffix = (f"_gen_n{cfg.neuron}_l{cfg.layer}_o{cfg.overwrite or 0:g}"
                  f"{'_neg' if cfg.negate else ''}_t{cfg.temperature:g}_s{cfg.seed}")
    else:
        chars, values = viz.neuron_values(model, cfg.text, cfg.neuron, cfg.layer, cfg.kind,
                                          negate=cfg.negate)
        prompt_end, out, title = None, None, f"neuron {cfg.neuron}{sign} ({cfg.kind}, layer {cfg.layer})"
        suffix = f"_n{cfg.neuron}_l{cfg.layer}_{cfg.kind}{'_neg' if cfg.negate else ''}"
    folder = Path(cfg.experiment_dir) / cfg.experiment_name / "heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in cfg.formats:
        path = viz.contained_path(folder, viz.safe_filename(cfg.text, f"{suffix}.{fmt}"))
        if fmt == "png":
            data = viz.render_png(chars, values, prompt_end, title=title, width=cfg.width, label=label)
            path.write_bytes(data)
        elif fmt == "svg":
            path.write_text(viz.render_svg(chars, values, prompt_end, title=title,
                                           width=cfg.width, label=label), encoding="utf-8")
        elif fmt == "html":
            path.write_text(viz.render_html(chars, values, prompt_end, title=title, label=label),
                            encoding="utf-8")
        else:
            record = {"text": "".join(chars), "neuron": cfg.neuron, "layer": cfg.layer,
                      "kind": "cell" if cfg.generate else cfg.kind, "negate": cfg.negate,
                      "checkpoint": cfg.load_model, "prompt_end": prompt_end,
                      "chars": chars, "values": [float(v) for v in values]}
            if out is not None:
                record.update(overwrite=cfg.overwrite, temperature=cfg.temperature,
                              seed=cfg.seed, seq_length=cfg.seq_length)
            path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        paths.append(path)
    return {"paths": paths, "chars": chars, "values": values, "prompt_end": prompt_end,
            "config": cfg, "generated": out}


def main(argv=None, generate: bool | None = None, prog: str = "visualize") -> int:
    """One script for both: ``--generate`` switches to generation (``generate=True`` forces
    it). Prints the files written; returns the exit status (2 on bad input)."""
    parser = build_parser(__doc__.splitlines()[0], VisualizeConfig)
    parser.prog = prog
    (cfg,) = parse([VisualizeConfig], argv, parser=parser)
    if generate is not None:
        cfg = replace(cfg, generate=generate)
    try:
        result = run(cfg)
    except (UsageError, CheckpointError, ValueError, OSError) as e:
        # Bad input (missing checkpoint, neuron out of range, empty text, ...): one line.
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if result["generated"] is not None:
        print(f"generated: {result['generated']['generated']!r}")
    for p in result["paths"]:
        print(p)
    return 0


def heatmap_main(argv=None) -> int:
    return main(argv, prog="sentdisc heatmap")


def generate_main(argv=None) -> int:
    return main(argv, generate=True, prog="sentdisc generate")


if __name__ == "__main__":
    sys.exit(main())
