"""What the consumer scripts (export_consumer.py, onnx_consumer.py, zero_shot_consumer.py)
run before anything else: packages a downstream team does not have made unimportable,
and checked to be, so that what the scripts load is proven to stand alone.

A name set to None in ``sys.modules`` makes ``import name`` and ``import name.sub``
raise ImportError, and ``importlib.util.find_spec(name)`` (transformers' check of what
is installed) return None: the package looks absent, as where it is not installed.
"""

import sys


def block(*names: str) -> None:
    for name in names:
        sys.modules[name] = None
    for name in names:
        try:
            __import__(name)
        except ImportError:
            continue
        raise SystemExit(f"{name} is importable: the check is void")
