"""``sentdisc score`` / ``python jobs/score.py``: a checkpoint + classifier + corpus -> Parquet.

    sentdisc score --load_model CKPT --classifier classifier.json \
        --data 's3://bucket/reviews/*.json.gz' --text_key reviewText --output s3://bucket/scored/

Reads any corpus the training readers read (loose JSON, JSON arrays, CSV/TSV, Parquet, text;
compressed or not; local or behind a URI), featurizes it on a Ray Data actor pool of model
replicas (``--replicas``, each ``--cpus_per_replica``), applies the classifier (its probe picks
the layer, feature kind and sentiment neuron) and streams Parquet to ``--output``: per record
file, line, [id], label, prob, prob_top, neuron_value, capped. Malformed records are counted by
reason and the first ``--examples`` listed in ``<output>/_summary.json``. Path values may use
environment variables. Submit to a cluster with ``ray job submit -- python jobs/score.py ...``;
the checkpoint, the corpus and the output must then be reachable from every node.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from sentdisc.config import parse
from sentdisc.data.config import FORMATS, DataConfig
from sentdisc.recipes import run


@dataclass
class ScoreConfig:
    load_model: str = field(default="", metadata={
        "help": "checkpoint directory or URI (defaults to the classifier's checkpoint)",
        "path": True})
    classifier: str = field(default="", metadata={
        "help": "transfer classifier.json (or its folder): weights, layer, feature kind, "
                "top neurons", "path": True})
    data: str = field(default="", metadata={
        "help": "corpus: files, folders, globs, comma list; local or a URI (s3://, gs://)",
        "path": True})
    text_key: str = field(default="reviewText", metadata={
        "help": "field/column holding the text"})
    id_key: str = field(default="", metadata={
        "help": "field/column holding each record's id, written as column 'id' (a record "
                "without one is counted as missing_key); file and line are always written"})
    output: str = field(default="", metadata={
        "help": "folder or URI the Parquet files and _summary.json are written to",
        "path": True})
    overwrite: bool = field(default=False, metadata={
        "help": "replace what --output holds (else a non-empty --output is an error)"})
    data_format: str = field(default="auto", metadata={"help": "|".join(FORMATS)})
    delim: str = field(default=",", metadata={"help": "CSV delimiter"})
    transliterate: bool = field(default=False, metadata={"help": "unidecode text to ASCII"})
    strict: bool = field(default=False, metadata={"help": "stop at the first malformed record"})
    max_record_bytes: int = field(default=DataConfig().max_record_bytes, metadata={
        "help": "a record's encoded bytes are cut here (column 'capped' says by how much)"})
    replicas: int = field(default=0, metadata={
        "help": "model replicas in the actor pool; 0: as many as fit the cluster (at most 2), "
                "leaving a CPU to read the corpus"})
    cpus_per_replica: int = field(default=1, metadata={
        "help": "CPUs (torch threads) each replica holds"})
    batch_size: int = field(default=128, metadata={"help": "texts featurized together"})
    chunk_size: int = field(default=256, metadata={"help": "bytes per recurrent chunk"})
    precision: str = field(default="auto", metadata={
        "help": "the replicas' products: auto (bf16 where the hardware multiplies it "
                "natively, else fp32) | fp32 | bf16"})
    rows_per_file: int = field(default=100_000, metadata={
        "help": "the fewest rows a Parquet file holds (the last may hold fewer)"})
    examples: int = field(default=20, metadata={
        "help": "malformed records listed (file, line, reason) in _summary.json"})


def data_config(cfg: ScoreConfig) -> DataConfig:
    """How the readers read the corpus: the id travels as the readers' label column."""
    return DataConfig(text_key=cfg.text_key, label_key=cfg.id_key or None,
                      data_format=cfg.data_format, delim=cfg.delim,
                      transliterate=cfg.transliterate, strict=cfg.strict,
                      max_record_bytes=cfg.max_record_bytes)


def score(cfg: ScoreConfig) -> dict:
    from sentdisc.errors import InputError
    from sentdisc.score import score_corpus

    if not cfg.data:
        raise InputError("--data is required (the corpus to score)")
    return score_corpus(cfg.data, cfg.load_model, cfg.classifier, cfg.output, data_config(cfg),
                        replicas=cfg.replicas, cpus_per_replica=cfg.cpus_per_replica,
                        batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
                        rows_per_file=cfg.rows_per_file, examples=cfg.examples,
                        overwrite=cfg.overwrite, precision=cfg.precision)


def main(argv=None) -> int:
    (cfg,) = parse([ScoreConfig], argv, "Batch scoring: a corpus -> Parquet of sentiment per "
                   "record (label, probabilities, the sentiment neuron's value)",
                   prog="sentdisc score")
    # Ray starts on first use (after the inputs are checked): under `ray job submit` it joins
    # the cluster named by RAY_ADDRESS, otherwise it starts a local one.
    return run("score", lambda: score(cfg))


if __name__ == "__main__":
    sys.exit(main())
