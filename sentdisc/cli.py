"""The ``sentdisc`` command: one entry point, each subcommand a library recipe's ``main``.

The scripts in ``jobs/`` call the same functions, so ``sentdisc pretrain ...`` and
``ray job submit -- python jobs/pretrain.py ...`` run identical code.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "pretrain": ("sentdisc.recipes.pretrain:main", "unsupervised byte-LM pretraining on Ray Train"),
    "transfer": ("sentdisc.recipes.transfer:main", "featurize + L1 logistic regression swept by Ray Tune"),
    "finetune": ("sentdisc.recipes.finetune:main", "fine-tune the LM with a classifier head on Ray Train"),
    "serve": ("sentdisc.serving.ingress:main", "serve run of the app, with Serve's fast ingress"),
    "score": ("sentdisc.recipes.score:main", "score a corpus -> Parquet of labels per record"),
    "heatmap": ("sentdisc.recipes.visualize:heatmap_main", "per-character heatmap of one neuron"),
    "generate": ("sentdisc.recipes.visualize:generate_main", "generate text, optionally forcing a neuron"),
    "data preprocess": ("sentdisc.data.preprocess:main", "encode a corpus once into Parquet shards"),
    "data fetch": ("sentdisc.data.fetch:main", "download public data or OpenAI's weights, verified"),
    "data synth": ("sentdisc.data.synth:main", "write a dump-shaped corpus with known bad records"),
    "convert-openai": ("sentdisc.cli:convert_openai_main", "OpenAI's 15 .npy files -> a checkpoint"),
}


def convert_openai_main(argv=None) -> int:
    import argparse

    from sentdisc.checkpoint import convert_openai
    from sentdisc.recipes import run

    p = argparse.ArgumentParser(prog="sentdisc convert-openai",
                                description="Convert OpenAI's sentiment-neuron weights (0.npy..14.npy)")
    p.add_argument("src", help="folder holding 0.npy .. 14.npy")
    p.add_argument("dst", help="checkpoint folder to write")
    args = p.parse_args(argv)
    return run("convert-openai", lambda: print(f"wrote {convert_openai(args.src, args.dst)}"))


def _usage() -> str:
    lines = ["usage: sentdisc <command> [options]", "", "commands:"]
    lines += [f"  {name:<17} {helptext}" for name, (_, helptext) in COMMANDS.items()]
    lines += ["", "Run 'sentdisc <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    for words in (2, 1):
        name = " ".join(argv[:words])
        if name in COMMANDS:
            module, func = COMMANDS[name][0].split(":")
            result = getattr(importlib.import_module(module), func)(argv[words:])
            return result if isinstance(result, int) else 0
    print(f"sentdisc: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
