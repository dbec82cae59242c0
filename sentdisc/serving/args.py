"""What configures the served application, and the checks that run before anything deploys.

Two kinds of settings, because Serve applies them differently:
  AppArgs      the application builder's arguments (``serve run sentdisc.serving:build_app
               key=value ...`` or a config file's ``args:``): files, request caps, device. A
               change rebuilds the application and restarts its replicas.
  BatchConfig  the deployment's ``user_config`` (a config file's ``deployments: - name:
               SentdiscServer user_config:``): the model's batch size. ``serve deploy`` with new values
               calls ``reconfigure`` on the live replicas; nothing restarts.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from sentdisc import storage
from sentdisc.errors import InputError
from sentdisc.probe import Probe


class AppArgsError(click.ClickException, InputError):
    """Bad application arguments or settings. ``serve run`` prints just the message (no
    traceback, no crash loop of replicas that can never start); Python callers get an
    InputError, a ValueError. Exit status 2, a usage error's (click's own default is 1)."""
    exit_code = 2


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str]

    @classmethod
    def model_validate(cls, obj: Any, **kwargs):
        # Serve validates a typed builder's args with this very call (and a replica its
        # user_config): one line naming the bad keys instead of pydantic's multi-line report.
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            problems = "; ".join(_describe(err) for err in e.errors())
            raise AppArgsError(f"sentdisc serve: bad {cls.what}: {problems}. "
                               f"Known: {', '.join(cls.model_fields)}") from None


class BatchConfig(_Settings):
    """The deployment's user_config: how many texts the model computes together."""
    what: ClassVar[str] = "user_config"

    max_batch_size: int = Field(32, ge=1, le=1024, description=(
        "texts in the model's running batch at most (serving.model_process): a request's "
        "texts join it at the next chunk and leave when they end; more wait for a free row"))


class AppArgs(_Settings):
    """Arguments of ``build_app``. Batch settings are not among them: see BatchConfig."""
    what: ClassVar[str] = "application arguments"

    checkpoint: str = Field(description="checkpoint folder or storage URI (s3://...): sentdisc "
                                        "format or OpenAI's 0..14.npy")
    classifier: str | None = Field(None, description="classifier.json (a path or URI); "
                                                     "/sentiment and /classify need it; "
                                                     "default: the checkpoint's own (a "
                                                     "fine-tuned checkpoint holds one)")
    feature_kind: Literal["cell", "hidden", "mean", "max"] | None = Field(
        None, description="features served by /featurize; default: the classifier's, else cell")
    layer: int | None = Field(None, description="layer to featurize; default: the classifier's, "
                                                "else -1")
    device: str = Field("auto", description="auto (cuda when the replica has a GPU) | cpu | "
                                            "cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="featurize's products: auto (bf16 where the replica's hardware "
                            "multiplies it natively: a GPU, a CPU with AVX-512 BF16 or AMX; "
                            "else fp32) | fp32 | bf16")
    max_texts: int = Field(64, ge=1, description="texts per request (more -> 422; in the schema)")
    max_text_bytes: int = Field(16384, ge=1, description="UTF-8 bytes per text (more -> 422; in the schema)")
    max_generate_length: int = Field(1000, ge=1, description="bytes per /generate (more -> 422)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        # whether a GPU is there is the replica's to say (serving.model_process); the name is
        # checked here, before anything deploys
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise PydanticCustomError("device", "auto, cpu, cuda or cuda:N (got {got})",
                                      {"got": repr(device)})
        return device


def _describe(err: dict) -> str:
    where = ".".join(map(str, err["loc"])) or "args"
    if err["type"] == "extra_forbidden" and err["loc"][0] in BatchConfig.model_fields:
        # Batch settings used to be builder arguments; say where they went.
        return (f"{where}: a batch setting, set in the deployment's user_config "
                f"(deployments: - name: SentdiscServer user_config: {{{where}: ...}})")
    return f"{where}: {err['msg']}"


def probe_of(args: AppArgs, classifier) -> Probe:
    """How to read the model: the classifier's rules, else the args' kind and layer."""
    if classifier is not None:
        return Probe.from_classifier(classifier)
    return Probe(layer=-1 if args.layer is None else args.layer,
                 feature_kind=args.feature_kind or "cell")


def load_classifier(path: str):
    from sentdisc.classifier import Classifier  # plain JSON, written by `sentdisc transfer`

    return Classifier.load(path)


def _checkpoint_config(ckpt: str):
    """The model config of a checkpoint: a sentdisc folder or storage URI, or a folder of
    OpenAI's weights (None for those in a bucket, which are checked when a replica loads them)."""
    from sentdisc.checkpoint import (
        MODEL_FILE,
        check_safetensors,
        is_openai_weights,
        load_config,
        openai_config,
    )

    try:
        storage.check_access(ckpt, "checkpoint")
        if not storage.is_dir(ckpt):
            raise AppArgsError(f"sentdisc serve: checkpoint {ckpt} does not exist or is not a "
                               "directory")
        if is_openai_weights(ckpt):
            # two .npy headers give the shapes; in a bucket they would mean fetching the files
            return None if storage.is_uri(ckpt) else openai_config(ckpt)
        config = load_config(ckpt)
    except AppArgsError:
        raise
    except InputError as e:
        raise AppArgsError(f"sentdisc serve: bad checkpoint: {e}") from None
    weights = storage.join(ckpt, MODEL_FILE)
    if not storage.is_file(weights):
        raise AppArgsError(f"sentdisc serve: {weights} is missing")
    try:  # a truncated or foreign file fails here, once, not in every replica's constructor
        check_safetensors(weights)
    except InputError as e:
        raise AppArgsError(f"sentdisc serve: bad checkpoint: {e}") from None
    return config


def _checked_classifier(path: str, args: AppArgs, ckpt: str, model_config):
    try:
        storage.check_access(path, "classifier")
        found = storage.is_file(path)
    except InputError as e:
        raise AppArgsError(f"sentdisc serve: {e}") from None
    if not found:
        raise AppArgsError(f"sentdisc serve: classifier {path} does not exist")
    try:
        clf = load_classifier(str(path))
    except (InputError, OSError) as e:
        raise AppArgsError(f"sentdisc serve: cannot read classifier {path}: {e}") from None
    if model_config is not None and clf.rnn_size != model_config.rnn_size:
        raise AppArgsError(f"sentdisc serve: classifier {path} expects rnn_size {clf.rnn_size} "
                           f"features, checkpoint {ckpt} has {model_config.rnn_size}")
    probe = Probe.from_classifier(clf)
    if args.feature_kind is not None and args.feature_kind != probe.feature_kind:
        raise AppArgsError(f"sentdisc serve: feature_kind={args.feature_kind} but the classifier "
                           f"was fitted on '{probe.feature_kind}' features")
    if args.layer is not None and args.layer != probe.layer:
        raise AppArgsError(f"sentdisc serve: layer={args.layer} but the classifier was fitted "
                           f"on layer {probe.layer}")
    return clf


def _where(checkpoint: str) -> set[str]:
    """The places a checkpoint argument can mean, resolved (symlinks too) without reading or
    converting anything; empty when unknown (a relative path that is not a folder here)."""
    import os

    from sentdisc.checkpoint import OPENAI, OPENAI_CHECKPOINT_DIR, OPENAI_WEIGHTS_DIR

    if not checkpoint:
        return set()
    if storage.is_uri(checkpoint):
        return {checkpoint.rstrip("/")}
    if checkpoint == OPENAI:
        from sentdisc.config import default_data_dir

        root = default_data_dir()
        return {os.path.realpath(root / d) for d in (OPENAI_CHECKPOINT_DIR, OPENAI_WEIGHTS_DIR)}
    path = os.path.expanduser(checkpoint)
    if not os.path.isabs(path) and not os.path.isdir(path):
        return set()  # relative to wherever it was fitted
    return {os.path.realpath(path)}


def checkpoint_mismatch(classifier, checkpoint: str) -> str | None:
    """A warning when ``classifier`` records having been fitted on another checkpoint than the
    served ``checkpoint`` (its features may mean nothing to it); None when they agree or the
    classifier does not say (an older file, a relative path from elsewhere)."""
    recorded = str(getattr(classifier, "checkpoint", "") or "")
    fitted, served = _where(recorded), _where(str(checkpoint))
    if not fitted or not served or fitted & served:
        return None
    return (f"sentdisc serve: the classifier was fitted on checkpoint {recorded}, but "
            f"{checkpoint} is served: its features may not be the ones it was fitted on")


def own_classifier(checkpoint: str) -> str | None:
    """The classifier.json a fine-tuned checkpoint holds (its head), if any."""
    from sentdisc.checkpoint import CLASSIFIER_FILE

    path = storage.join(checkpoint, CLASSIFIER_FILE)
    try:
        return path if storage.is_file(path) else None
    except InputError:
        return None


def check_args(args: AppArgs) -> AppArgs:
    """Check the files ``args`` name before anything deploys. Returns the args with absolute
    paths (replicas do not run in this folder) and the served feature kind and layer filled in:
    the classifier's, so that the features served are the ones it was fitted on."""
    from sentdisc.checkpoint import resolve
    from sentdisc.model import check_layer

    try:  # "openai": OpenAI's released weights, wherever `sentdisc data fetch` put them
        ckpt = storage.absolute(str(resolve(args.checkpoint)))
    except InputError as e:
        raise AppArgsError(f"sentdisc serve: {e}") from None
    model_config = _checkpoint_config(ckpt)
    clf_path = clf = None
    if args.classifier is None:
        clf_path = own_classifier(ckpt)
    else:
        clf_path = storage.absolute(args.classifier)
    if clf_path is not None:
        clf = _checked_classifier(clf_path, args, ckpt, model_config)
    probe = probe_of(args, clf)
    if model_config is not None:
        try:
            check_layer(probe.layer, model_config.layers)
        except ValueError as e:
            raise AppArgsError(f"sentdisc serve: {e} (checkpoint {ckpt})") from None
    return args.model_copy(update={
        "checkpoint": str(ckpt), "classifier": clf_path,
        "feature_kind": probe.feature_kind, "layer": probe.layer})
