"""sentdisc: unsupervised sentiment discovery with a byte-level mLSTM, on Ray.

Exports load lazily: Ray Data tasks that only need ``sentdisc.text`` should not pay for
importing torch.
"""
import importlib

_EXPORTS = {
    "ByteLM": "sentdisc.model", "ModelConfig": "sentdisc.model",
    "CheckpointError": "sentdisc.checkpoint", "load": "sentdisc.checkpoint",
    "load_openai": "sentdisc.checkpoint", "save": "sentdisc.checkpoint",
    "featurize": "sentdisc.features", "Classifier": "sentdisc.classifier",
    "neuron_values": "sentdisc.viz", "generate_text": "sentdisc.viz",
    "encode": "sentdisc.text", "encode_batch": "sentdisc.text", "decode": "sentdisc.text",
    "preprocess": "sentdisc.text",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sentdisc' has no attribute {name!r}")
