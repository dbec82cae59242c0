"""The serving application moved into the package (sentdisc.serving); this keeps the old import
path, ``serve run serve.app:build_app ...`` from a checkout, working."""
from sentdisc.serving import *  # noqa: F403
from sentdisc.serving import __all__  # noqa: F401
