"""bdlab: a laboratory for neural backdoors in image classifiers.

The Python API (:mod:`bdlab.api`, docs/api.md) is at the top level: ``bdlab.load_data``, ``bdlab.from_tensors``,
``bdlab.attack``, ``bdlab.train``, ``bdlab.measure``, ``bdlab.defense``, ``bdlab.save_weights``.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("load_data", "from_tensors", "attack", "defense", "train", "measure")


def __getattr__(name: str) -> Any:
    # imported on first use: `python -m bdlab.run` and the tests need not pay for (or cycle through) the API
    if name in _API:
        from bdlab import api

        return getattr(api, name)
    if name == "save_weights":
        from bdlab.models.weights import save_weights

        return save_weights
    raise AttributeError(f"module 'bdlab' has no attribute {name!r}")
