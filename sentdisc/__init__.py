"""sentdisc: unsupervised sentiment discovery with a byte-level mLSTM, on Ray."""
from sentdisc.checkpoint import CheckpointError, load, load_openai, save
from sentdisc.featurize import featurize
from sentdisc.model import ByteLM, ModelConfig
from sentdisc.text import decode, encode, encode_batch, preprocess

__all__ = ["ByteLM", "ModelConfig", "CheckpointError", "featurize", "load", "load_openai",
           "save", "encode", "encode_batch", "decode", "preprocess"]
__version__ = "0.1.0"
