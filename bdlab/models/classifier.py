"""The wrapper every victim runs inside: pixel-space input, normalisation, activations of named layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bdlab.errors import ConfigError

# names features() takes beside the backbone's own modules
PENULTIMATE = "penultimate"
LOGITS = "logits"


class Classifier(nn.Module):
    """Takes float images in ``[0, 1]``, normalises them with the dataset's statistics, runs ``net``.

    Keeping normalisation here means triggers, transforms and metrics all live in pixel space.
    Layers are addressed by the backbone's module names (``conv1``, ``layer3``, ``fc2``, ...; see
    :meth:`layer_names`), plus ``penultimate`` (the flattened input of the last linear layer) and
    ``logits``.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    def last_linear(self) -> nn.Linear:
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TypeError("the network has no nn.Linear head to read penultimate features from")
        return linears[-1]

    def layer_names(self) -> list[str]:
        """Every name :meth:`features` takes: the backbone's named modules, ``penultimate``, ``logits``."""
        return [name for name, _ in self.net.named_modules() if name] + [PENULTIMATE, LOGITS]

    def check_layer(self, field: str, layer: str) -> None:
        """Raise one ConfigError line, listing the model's layers, unless ``layer`` names one."""
        if layer not in self.layer_names():
            raise ConfigError(field, f"the model has no layer {layer!r}; its layers are: "
                              f"{', '.join(self.layer_names())}")

    def features(self, x: Tensor, layers: str | Sequence[str]) -> Tensor | dict[str, Tensor]:
        """Activations of the named layer(s) for float images ``x`` in ``[0, 1]``, in one forward pass.

        One name gives a tensor; a list gives ``{name: tensor}``. Module outputs keep their shape
        (``(N, C, H, W)`` for convolutions); ``penultimate`` is flattened to ``(N, D)``. Gradients
        flow through every returned tensor.
        """
        names = [layers] if isinstance(layers, str) else list(layers)
        modules = dict(self.net.named_modules())
        unknown = [name for name in names if name not in modules and name not in (PENULTIMATE, LOGITS)]
        if unknown:
            raise ValueError(f"the model has no layer {unknown[0]!r}; its layers are: {', '.join(self.layer_names())}")
        captured: dict[str, Tensor] = {}
        handles = []

        def keep(name: str, from_input: bool) -> Callable:
            # a clone, so an in-place activation after the layer cannot overwrite what was captured
            def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                captured[name] = inputs[0].flatten(1) if from_input else output.clone()
            return hook

        try:
            for name in names:
                if name == PENULTIMATE:
                    handles.append(self.last_linear().register_forward_hook(keep(name, True)))
                elif name != LOGITS:
                    handles.append(modules[name].register_forward_hook(keep(name, False)))
            logits = self(x)
        finally:
            for handle in handles:
                handle.remove()
        captured[LOGITS] = logits
        return captured[names[0]] if isinstance(layers, str) else {name: captured[name] for name in names}

    def penultimate(self, x: Tensor) -> Tensor:
        """The input of the last linear layer (the features spectral signatures and AC read)."""
        return self.features(x, PENULTIMATE)


def build_classifier(net_factory: Callable[..., nn.Module], input_shape: tuple[int, int, int], num_classes: int,
                     mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """Instantiate the backbone for this dataset and check it accepts the dataset's images."""
    channels, height, width = input_shape
    try:
        net = net_factory(in_channels=channels, num_classes=num_classes, input_size=(height, width))
        model = Classifier(net, mean, std)
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, channels, height, width))
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError("model", f"cannot take the dataset's {channels}x{height}x{width} input ({error}); "
                          "pick a model for this input size") from error
    if out.shape != (2, num_classes):
        raise ConfigError("model", f"outputs {tuple(out.shape[1:])} for {num_classes} classes")
    return model
