"""Batch scoring: a corpus on any storage -> Parquet of the classifier's sentiment per record.

    sentdisc score --load_model CKPT --classifier classifier.json --data CORPUS --output DIR

Composed of the pieces the other jobs use, all streaming, so memory stays flat whatever the
corpus size::

    list_corpus (driver: every path error here, before any task)
      -> read_files: CorpusDatasource + parse stage (sentdisc.data.readers)  rows + error/file/line
      -> survey(rows, examples): its counts + the first bad records        (summary, ETA total)
      -> map_batches(texts_to_score), filter(error == ""): good rows as texts  (in the read tasks)
      -> map_batches(_ScoreReplica) on an actor pool: features_ray's replica + the classifier
      -> write_parquet(output)

The classifier's ``Probe`` says which layer and feature kind to featurize and which neuron is
the sentiment neuron. The output may not be, hold or lie inside the corpus (``--overwrite``
would delete it). Output columns, one row per well-formed record (``columns``): ``file``,
``line`` (1-based; the record number for CSV, JSON arrays and Parquet), ``id`` (with
``id_key``), the classifier's answer (binary: ``label``, the name ``Classifier.predict_labels``
gives, ``prob`` = P(labels[1]) and, when it has a top-neuron model, ``prob_top``; multi-class:
``label`` and a ``prob_<label>`` per label; multi-label: ``labels`` and a ``prob_<label>`` per
label), ``neuron_value`` (the top neuron's raw feature; its sign is in the summary) and
``capped`` (bytes cut from a record over ``max_record_bytes``: it was scored on its first
bytes). Malformed records are no rows: ``_summary.json`` beside the Parquet files counts them
by reason and lists the first ones by (file, line), and says the classifier's ``labels``
(binary: ``prob`` is P(labels[1])); the '_' keeps Parquet readers from taking it for data.

The tally reads the corpus once more than scoring needs: parsing runs at tens of MB/s per
core, the mLSTM at KB/s, so the pass is cheap next to the scoring and buys exact malformed
counts and a progress line with an ETA (``benchmarks/bench_score.py`` measures both).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentdisc import storage
from sentdisc.classifier import Classifier
from sentdisc.data.config import DataConfig, DataError, file_format
from sentdisc.data.readers import list_corpus, read_files, skipped_by_reason, survey
from sentdisc.errors import InputError, RunFailed
from sentdisc.probe import Probe
from sentdisc.report import ProgressLine

SUMMARY = "_summary.json"
PRECISIONS = ("auto", "fp32", "bf16")  # what featurize takes (sentdisc.features)
CALL_BATCHES = 4  # rows per replica call = 4 featurize pools: refilled rows, a short tail


def columns(id_key: str = "", clf: Classifier | None = None) -> list[str]:
    """The output's columns, in order: for a binary classifier ``label`` (its name:
    ``labels[0]`` or ``labels[1]``), ``prob`` (P(labels[1])) and ``prob_top`` (when it has a
    top-neuron model); for multi-class ``label`` (its name) and one ``prob_<label>`` per
    label; for multi-label ``labels`` (those over 0.5) and one ``prob_<label>`` per label."""
    head = ["file", "line"] + (["id"] if id_key else [])
    if clf is None or clf.label_kind == "binary":
        top = ["prob_top"] if clf is None or clf.has_top else []
        return head + ["label", "prob", *top, "neuron_value", "capped"]
    said = "labels" if clf.label_kind == "multilabel" else "label"
    return head + [said] + prob_columns(clf) + ["neuron_value", "capped"]


def prob_columns(clf: Classifier) -> list[str]:
    return [f"prob_{label}" for label in clf.labels]


# ----------------------------------------------------------------------------- inputs

def model_shape(checkpoint: str) -> tuple[int, int]:
    """(rnn_size, layers) of a checkpoint from its config, without loading its weights."""
    from sentdisc.checkpoint import CheckpointError, load_config

    if not storage.is_dir(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    config = load_config(checkpoint)
    return config.rnn_size, config.layers


def _location(path: str) -> tuple:
    """A path as comparable parts: ('', *parts of the resolved local path) or (scheme, bucket,
    *key parts) of a URI (``file://`` is local; s3a is s3, gcs is gs; a user@ is dropped)."""
    path = str(path).strip()
    if storage.is_uri(path):
        scheme, _, rest = path.partition("://")
        scheme = scheme.lower()
        if scheme == "file":
            path = "/" + rest.partition("/")[2] if not rest.startswith("/") else rest
        else:
            authority, _, key = rest.partition("/")
            scheme = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}.get(scheme, scheme)
            bucket = authority.rpartition("@")[2].lower()
            return (scheme, bucket, *[p for p in key.split("/") if p not in ("", ".")])
    return ("", *Path(os.path.realpath(os.path.expanduser(path))).parts)


def _fixed_part(part: str) -> str:
    """A glob's folder before its first wildcard (the path itself if it has none)."""
    head = part
    for i, ch in enumerate(part):
        if ch in "*?[":
            head = part[:i].rsplit("/", 1)[0] if "/" in part[:i] else "."
            break
    return head


def check_output_apart(output: str, data: str) -> None:
    """--output must not be, hold or lie inside a --data path: --overwrite would delete the
    corpus, and the Parquet written would be read as corpus next time."""
    out = _location(output)
    for part in (p.strip() for p in str(data or "").split(",")):
        if not part:
            continue
        fixed = _fixed_part(part)
        src = _location(fixed)
        n = min(len(src), len(out))
        # a glob reads only the files it matches: an output beside them, in its folder, is
        # apart from them
        if src[:n] != out[:n] or fixed != part and len(out) > len(src):
            continue
        how = "holds" if len(out) < len(src) or fixed != part else \
            "is" if len(src) == len(out) else "lies in"
        raise InputError(f"--output {output} {how} the --data path {part}: scoring would "
                         f"write into (with --overwrite: delete) the corpus; name an output "
                         f"folder outside it")


def check_inputs(checkpoint: str, classifier: str, output: str,
                 overwrite: bool = False, data: str = "") -> tuple[Classifier, str]:
    """The classifier and the checkpoint it scores with (default: the one it names), checked
    against each other, and an output folder apart from the corpus ``data`` that holds no
    earlier run; one line each."""
    if not output:
        raise InputError("--output is required (a folder or URI for the Parquet files)")
    check_output_apart(output, data)
    if not classifier:
        from sentdisc.serving.args import own_classifier

        classifier = own_classifier(checkpoint) if checkpoint else None
        if classifier is None:
            raise InputError("--classifier is required (a transfer run's classifier.json), "
                             "unless --load_model is a fine-tuned checkpoint, which holds one")
    clf = Classifier.load(classifier)
    checkpoint = checkpoint or clf.checkpoint
    if not checkpoint:
        raise InputError("--load_model is required (a checkpoint directory), unless the "
                         "classifier names its checkpoint")
    from sentdisc.checkpoint import resolve

    checkpoint = str(resolve(checkpoint))  # "openai": the converted folder, as everywhere
    rnn_size, layers = model_shape(checkpoint)
    if clf.rnn_size != rnn_size:
        raise InputError(f"classifier {classifier} expects rnn_size {clf.rnn_size} features, "
                         f"checkpoint {checkpoint} has rnn_size {rnn_size}")
    if not -layers <= clf.layer < layers:
        raise InputError(f"classifier {classifier} reads layer {clf.layer}, checkpoint "
                         f"{checkpoint} has {layers} layer(s)")
    storage.check_access(output, "--output")
    if storage.is_file(output):
        raise InputError(f"--output {output} is a file: scoring writes a folder")
    if storage.list_dir(output) and not overwrite:
        raise InputError(f"--output {output} is not empty: name a new folder, or pass "
                         f"--overwrite to replace what it holds")
    return clf, str(checkpoint)


def check_ids(files: list, cfg: DataConfig) -> None:
    """--id_key needs records with fields: a text file's lines have none, and every record
    would be scored with a null id."""
    if not cfg.label_key:
        return
    text = [uri for uri, _ in files if file_format(uri, cfg) == "text"]
    if text:
        raise InputError(f"--id_key {cfg.label_key}: {text[0]} is read as text (one record a "
                         f"line, no fields{f', and {len(text) - 1} more' if len(text) > 1 else ''}"
                         f"), so no record has an id: leave --id_key out (file and line name "
                         f"each record), or say with --data_format how to read it if it is no text")


def check_options(replicas: int, cpus_per_replica: int, batch_size: int, chunk_size: int,
                  rows_per_file: int, examples: int, precision: str = "auto") -> None:
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    if replicas < 0:
        raise InputError(f"--replicas must be >= 0 (0: as many as fit), got {replicas}")
    for name, value in (("cpus_per_replica", cpus_per_replica),
                        ("batch_size", batch_size), ("chunk_size", chunk_size),
                        ("rows_per_file", rows_per_file)):
        if value < 1:
            raise InputError(f"--{name} must be >= 1, got {value}")
    if examples < 0:
        raise InputError(f"--examples must be >= 0, got {examples}")


DEFAULT_REPLICAS = 2  # at most, when --replicas is 0 (auto): one survives the other's loss


def fit_replicas(replicas: int, cpus_per_replica: int, have: float) -> tuple[int, str]:
    """(replicas, why): ``replicas`` (0: as many as fit, up to DEFAULT_REPLICAS) on a
    cluster of ``have`` CPUs. Replicas hold their CPUs for the whole run and one CPU must be
    left to read the corpus: with none left no read task could start and Ray Data would wait
    forever. Pure: the numbers in, the decision out."""
    room = int((have - 1) // cpus_per_replica)
    if replicas == 0:
        if room < 1:
            raise InputError(f"--cpus_per_replica {cpus_per_replica} needs "
                             f"{cpus_per_replica + 1} CPUs (one left to read the corpus); the "
                             f"cluster has {have:g}: lower --cpus_per_replica")
        chosen = min(DEFAULT_REPLICAS, room)
        return chosen, (f"{chosen} replica(s) x {cpus_per_replica} CPU: what fits the "
                        f"cluster's {have:g} CPUs with one left to read the corpus "
                        f"(--replicas N to choose)")
    if room < replicas:
        raise InputError(f"--replicas {replicas} x --cpus_per_replica {cpus_per_replica} "
                         f"needs {replicas * cpus_per_replica + 1} CPUs (one left to read the "
                         f"corpus); the cluster has {have:g}: lower --replicas (or leave it "
                         f"0: as many as fit)")
    return replicas, f"{replicas} replica(s) x {cpus_per_replica} CPU, as asked"


def check_cpus(replicas: int, cpus_per_replica: int) -> tuple[int, str]:
    """``fit_replicas`` on this Ray cluster's CPUs."""
    import ray

    return fit_replicas(replicas, cpus_per_replica, ray.cluster_resources().get("CPU", 0))


# ----------------------------------------------------------------------------- counts

def check_records(counts: dict, data: str, cfg: DataConfig) -> None:
    """No well-formed record is bad input: name the key when it is what every record lacks."""
    if counts["records"]:
        return
    bad = skipped_by_reason(counts)
    lacking = bad.pop("missing_key", 0)
    others = f"; malformed otherwise: {json.dumps(bad)}" if bad else ""
    if lacking:
        keys = f"the field {cfg.text_key!r} (--text_key)" + (
            f" and the field {cfg.label_key!r} (--id_key)" if cfg.label_key else "")
        raise DataError(f"{data}: no record has {keys}: {lacking} of {counts['lines']} "
                        f"lines lack one{others}")
    raise DataError(f"{data}: no well-formed record in {counts['lines']} lines{others}")


# ----------------------------------------------------------------------------- scoring

def texts_to_score(id_key: bool):
    """Rows -> (text, error, file, line, capped[, id]): every row, the bad ones text-less."""

    def select(table: pa.Table) -> pa.Table:
        # The rows hold preprocessed bytes ("\n " + text + " ", HTML unescaped) and featurize
        # preprocesses what it is given. Its trim and pad give the same bytes back; escaping
        # '&' makes its HTML unescape a no-op too (unescaped twice, a review's literal "&lt;"
        # would become "<"), so scores equal featurize on the original texts.
        text = pc.replace_substring(table.column("bytes").cast(pa.large_string()), "&", "&amp;")
        cols = {"text": text, **{c: table.column(c) for c in ("error", "file", "line", "capped")}}
        if id_key:  # the reader carries the id as the label column: as written, a string
            cols["id"] = table.column("label").cast(pa.string())
        return pa.table(cols)

    return select


def rss_mib() -> float:
    """This process's resident memory now (MiB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: the peak so far
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _ScoreReplica:
    """One model replica of the actor pool: ``features_ray``'s featurize replica (the model
    loaded once), then the classifier on its features; reports each batch to the counter."""

    def __init__(self, checkpoint: str, classifier: dict, batch_size: int, chunk_size: int,
                 threads: int, counter, names: list, precision: str = "auto"):
        from sentdisc.features_ray import _FeaturizeReplica

        self.clf = Classifier.from_dict(classifier)
        probe = Probe.from_classifier(self.clf)
        self.neuron, self.names, self.counter = probe.neuron, names, counter
        self.featurize = _FeaturizeReplica(checkpoint, probe.feature_kind, probe.layer,
                                           batch_size, chunk_size, threads, precision)

    def __call__(self, batch: dict) -> dict:
        out = self.featurize(batch)
        feats = out.pop("features")
        clf = self.clf
        if clf.label_kind == "binary":  # the label's name, as every other kind writes it
            out.update(label=np.array(clf.predict_labels(feats), dtype=object),
                       prob=clf.predict_proba(feats))
            if clf.has_top:
                out["prob_top"] = clf.predict_proba_top(feats)
        else:
            said = clf.predict_labels(feats)
            if clf.label_kind == "multilabel":
                out["labels"] = np.empty(len(said), dtype=object)  # a list of names per row
                for i, names in enumerate(said):
                    out["labels"][i] = names
            else:
                out["label"] = np.array(said, dtype=object)
            out.update(zip(prob_columns(clf), clf.label_proba(feats).T, strict=True))
        out["neuron_value"] = feats[:, self.neuron]
        self.counter.add.remote(len(feats), os.getpid(), rss_mib())
        return {k: out[k] for k in self.names}


def _counter():
    import ray

    @ray.remote(num_cpus=0)
    class Scored:
        """Texts scored so far, each replica's peak RSS, when the first and the last batch
        came (the rate once the replicas run, start-up excluded): the driver polls it."""

        def __init__(self):
            self.done, self.rss, self.first, self.last = 0, {}, None, None

        def add(self, n: int, pid: int, rss: float):
            self.done += n
            self.rss[pid] = max(self.rss.get(pid, 0.0), rss)
            self.first = self.first or (time.time(), n)
            self.last = time.time()

        def state(self) -> tuple:
            return self.done, self.rss, self.first, self.last

    return Scored.remote()


class _Watch:
    """While the write runs: the progress line (texts/s, ETA) from the replicas' count, and
    the driver's peak RSS, sampled every ``every`` s on a thread."""

    def __init__(self, counter, total: int, total_bytes: int, every: float = 0.5):
        self.counter, self.every = counter, every
        self.line = ProgressLine("score", total, total_bytes, every=2.0)
        self.done, self.replica_rss, self.driver_rss = 0, {}, rss_mib()
        self.first, self.last = None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()

    def poll(self) -> None:
        import ray

        done, self.replica_rss, self.first, self.last = ray.get(self.counter.state.remote())
        self.driver_rss = max(self.driver_rss, rss_mib())
        if done != self.done:
            self.done = done
            self.line(done)

    def steady_rate(self) -> float | None:
        """Texts/s from the first batch's end to the last one's: the replicas' throughput."""
        if not self.first or self.last <= self.first[0]:
            return None
        return (self.done - self.first[1]) / (self.last - self.first[0])


def scored(rows, checkpoint: str, clf: Classifier, id_key: str, batch_size: int,
           chunk_size: int, replicas: int, cpus_per_replica: int, counter,
           precision: str = "auto"):
    """Rows -> scored rows (``columns``), featurized on ``replicas`` model replicas."""
    import ray
    from ray.data.expressions import col

    # The bad rows are the tally's. Dropping them is a filter, and Ray Data fuses no filter
    # into a batched stage after it: reading, parsing and this stay in tasks, and blocks reach
    # a replica (which joins several into a batch) as texts with string ids, not as rows
    # whose id types may differ from file to file.
    texts = rows.map_batches(texts_to_score(bool(id_key)), batch_format="pyarrow",
                             batch_size=None).filter(expr=col("error") == "")
    return texts.map_batches(
        _ScoreReplica, batch_size=batch_size * CALL_BATCHES, batch_format="numpy",
        fn_constructor_args=(checkpoint, clf.to_dict(), batch_size, chunk_size,
                             cpus_per_replica, counter, columns(id_key, clf), precision),
        compute=ray.data.ActorPoolStrategy(size=replicas), num_cpus=cpus_per_replica)


def write(ds, output: str, rows_per_file: int, overwrite: bool) -> None:
    from ray.data import SaveMode

    path, fs = storage.for_ray(output)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=rows_per_file,
                     mode=SaveMode.OVERWRITE if overwrite else SaveMode.APPEND)


def written(output: str) -> tuple[int, int]:
    """(rows, files) in the Parquet files under ``output``, from their footers."""
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(output)
    found = pads.dataset(path, filesystem=fs, format="parquet")
    return found.count_rows(), len(found.files)


# ----------------------------------------------------------------------------- the job

def score_corpus(data: str, checkpoint: str, classifier: str, output: str,
                 data_cfg: DataConfig | None = None, *, replicas: int = 0,
                 cpus_per_replica: int = 1, batch_size: int = 128, chunk_size: int = 256,
                 rows_per_file: int = 100_000, examples: int = 20, overwrite: bool = False,
                 precision: str = "auto", log=print) -> dict:
    """Score every record of ``data`` into Parquet under ``output``; returns the summary
    (also written to ``output/_summary.json`` and printed). ``data_cfg`` says how to read
    the corpus (text_key, data_format, ...; its label_key is the id column). The checkpoint
    and the output must be reachable from every node."""
    from sentdisc.runtime import ensure_ray

    t0 = time.perf_counter()
    data_cfg = data_cfg or DataConfig()
    check_options(replicas, cpus_per_replica, batch_size, chunk_size, rows_per_file, examples,
                  precision)
    clf, checkpoint = check_inputs(checkpoint, classifier, output, overwrite, data)
    files = list_corpus(data)
    check_ids(files, data_cfg)
    ensure_ray(include_dashboard=False)
    replicas, why = check_cpus(replicas, cpus_per_replica)
    log(f"score: {why}")
    rows = read_files(files, data_cfg)
    counts = survey(rows, examples)
    check_records(counts, data, data_cfg)
    t1 = time.perf_counter()
    log(f"score: {counts['records']} records in {len(files)} file(s), "
        f"{sum(skipped_by_reason(counts).values())} malformed; scoring on {replicas} replica(s)")
    counter = _counter()
    with _Watch(counter, counts["records"], counts["bytes"]) as watch:
        write(scored(rows, checkpoint, clf, data_cfg.label_key or "", batch_size, chunk_size,
                     replicas, cpus_per_replica, counter, precision), output, rows_per_file,
              overwrite)
    t2 = time.perf_counter()
    n_rows, n_files = written(output)
    summary = summarize(counts, n_rows, n_files, (t0, t1, t2, time.perf_counter()), watch,
                        dict(data=data, checkpoint=checkpoint, classifier=str(classifier),
                             output=output, replicas=replicas, id_key=data_cfg.label_key,
                             columns=columns(data_cfg.label_key or "", clf)))
    storage.write_json(storage.join(output, SUMMARY), {**summary, **probe_fields(clf)})
    log(summary_lines(summary))
    if n_rows != counts["records"]:
        raise RunFailed(f"wrote {n_rows} rows for {counts['records']} well-formed records "
                        f"(see {storage.join(output, SUMMARY)})")
    return summary


def probe_fields(clf: Classifier) -> dict:
    probe = Probe.from_classifier(clf)
    return {"neuron": probe.neuron, "sign": probe.signs[0], "top_neurons": list(probe.neurons),
            "layer": probe.layer, "feature_kind": probe.feature_kind,
            "label_kind": clf.label_kind, "labels": clf.labels}


def summarize(counts: dict, n_rows: int, n_files: int, times: tuple, watch: _Watch,
              run: dict) -> dict:
    t0, t1, t2, t3 = times
    bad = skipped_by_reason(counts)
    return {**run,
            "rows_written": n_rows, "files_written": n_files,
            "lines": counts["lines"], "records": counts["records"],
            "malformed_total": sum(bad.values()), "malformed": bad,
            "malformed_examples": counts["examples"], "corrupt_files": counts["corrupt_files"],
            "capped_records": counts["capped_records"], "capped_bytes": counts["capped_bytes"],
            "texts_per_s": round(n_rows / max(t2 - t1, 1e-9), 2),
            "steady_texts_per_s": _round(watch.steady_rate(), 2),
            "bytes_per_s": round(counts["bytes"] / max(t2 - t1, 1e-9), 1),
            "seconds": {"wall": round(t3 - t0, 2), "tally": round(t1 - t0, 2),
                        "scoring": round(t2 - t1, 2)},
            "peak_rss_mib": {"driver": round(watch.driver_rss, 1),
                             "replica_max": round(max(watch.replica_rss.values(), default=0), 1)}}


def _round(v, digits: int):
    return None if v is None else round(v, digits)


def summary_lines(s: dict) -> str:
    bad = ", ".join(f"{k} {v}" for k, v in sorted(s["malformed"].items())) or "none"
    listed = (f"; the first {len(s['malformed_examples'])} listed in "
              f"{storage.join(s['output'], SUMMARY)}" if s["malformed_examples"] else "")
    sec, rss = s["seconds"], s["peak_rss_mib"]
    return "\n".join([
        f"score: wrote {s['rows_written']} rows to {s['output']} ({s['files_written']} file(s))",
        f"score: malformed {s['malformed_total']} of {s['lines']} lines: {bad}{listed}",
        f"score: {s['texts_per_s']:.1f} texts/s ({s['bytes_per_s'] / 1e3:.1f} KB/s; "
        f"{s['steady_texts_per_s'] or 0:.1f} texts/s once started) on {s['replicas']} "
        f"replica(s); wall {sec['wall']:.1f} s (tally {sec['tally']:.1f} s, scoring "
        f"{sec['scoring']:.1f} s); peak RSS driver {rss['driver']:.0f} MiB, replica "
        f"{rss['replica_max']:.0f} MiB"])
