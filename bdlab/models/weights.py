"""Given weights: a state dict read from a file the user trusts no more than any download.

Two formats are read, neither of which runs code: safetensors, and a ``torch.save``'d state dict read
with ``torch.load(weights_only=True)``. A pickled whole model (``torch.save(model)``) is refused: unpickling
it would run whatever the file says. Keys are matched against the backbone (``conv1.weight``), bdlab's
wrapper (``net.conv1.weight``) or common training wrappers (``model.``, ``module.``), so a state dict
saved by a plain PyTorch loop, by bdlab, by Lightning or by DataParallel loads alike.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bdlab.errors import ConfigError

#: prefixes a saved state dict may carry in front of the backbone's own keys, tried in this order
PREFIXES = ("", "net.", "model.net.", "model.", "module.", "module.net.")
#: bdlab's wrapper buffers: normalisation comes from the config or the dataset, never from the file
WRAPPER_KEYS = ("mean", "std")
SAVE_HINT = "save model.state_dict() with torch.save or safetensors.torch.save_file"


def read_state_dict(path: str | Path, field: str = "model.weights") -> dict[str, Tensor]:
    """The tensors of a safetensors file or of a ``torch.save``'d state dict (``weights_only=True``); a
    Lightning checkpoint's ``state_dict`` entry is taken. Raises one ConfigError line for a missing file,
    a pickled model or anything that is not a state dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(field, f"no file at {file}; give the path of a .safetensors file or a torch.save'd "
                          "state dict")
    if file.suffix == ".safetensors":
        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError) as error:
            raise ConfigError(field, f"{file} is not a safetensors file ({error}); {SAVE_HINT}") from None
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses every class but tensors and containers: a file that names one pickles objects
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        if found is None:
            raise ConfigError(field, f"{file} is neither safetensors nor a torch.save file; {SAVE_HINT}") from None
        raise ConfigError(field, f"{file} is a pickled {found.group(1)}, not a state dict; bdlab never unpickles "
                          f"a model: {SAVE_HINT}") from None
    except Exception as error:  # not a torch file at all: any reader error means the same to the user
        raise ConfigError(field, f"{file} is neither safetensors nor a torch.save file ({type(error).__name__}); "
                          f"{SAVE_HINT}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ConfigError(field, f"{file} holds a {type(loaded).__name__}, not a state dict of tensors; {SAVE_HINT}")
    return {str(key): value for key, value in loaded.items()}


def _listed(keys: set[str], limit: int = 6) -> str:
    names = sorted(keys)
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def backbone_state(state: dict[str, Tensor], net: nn.Module, field: str = "model.weights") -> dict[str, Tensor]:
    """``state``'s entries under ``net``'s own key names, checked key by key and shape by shape: one
    ConfigError line names the missing and unexpected keys (or the first wrong shape)."""
    expected = net.state_dict()
    best: tuple[int, dict[str, Tensor]] = (-1, {})
    for prefix in PREFIXES:
        candidate = {k.removeprefix(prefix): v for k, v in state.items()
                     if k.startswith(prefix) and k not in WRAPPER_KEYS}
        overlap = len(set(candidate) & set(expected))
        if set(candidate) == set(expected):
            best = (overlap, candidate)
            break
        if overlap > best[0]:
            best = (overlap, candidate)
    found = best[1]
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    if missing or unexpected:
        raise ConfigError(field, f"the file's keys do not match {type(net).__name__}: missing "
                          f"{_listed(missing) or 'none'}; unexpected {_listed(unexpected) or 'none'} "
                          "(check model=/model.net and the dataset's classes)")
    for key, value in expected.items():
        if found[key].shape != value.shape:
            raise ConfigError(field, f"{key} has shape {tuple(found[key].shape)} in the file but "
                              f"{tuple(value.shape)} in {type(net).__name__} for this dataset "
                              "(check model=/model.net, the image size and the number of classes)")
    return found


def load_weights(net: nn.Module, state: dict[str, Tensor], field: str = "model.weights") -> nn.Module:
    """Load ``state`` (see :func:`backbone_state`) into ``net`` in place; returns ``net``."""
    net.load_state_dict(backbone_state(state, net, field))
    return net


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write a model's backbone weights as safetensors (a :class:`~bdlab.models.classifier.Classifier`'s
    ``net``; normalisation is the config's), the format ``model.weights`` reads."""
    net = getattr(model, "net", model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path
