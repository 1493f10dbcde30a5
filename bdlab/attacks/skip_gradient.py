"""Scaling the gradient that flows back through the skip connections of residual blocks (TrojanZoo §6.2,
RQ5, Fig. 8), with tensor backward hooks installed by forward hooks, removable after training."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bdlab.errors import ConfigError
from bdlab.models.resnet import BasicBlock


def residual_shortcuts(net: nn.Module) -> list[nn.Module]:
    """The skip-path modules of ``net``'s residual blocks: ``shortcut`` of bdlab's :class:`BasicBlock`
    (an empty ``Sequential`` for the identity, a 1x1 convolution and batch norm where the shape changes).

    Only blocks whose skip path is a module of its own qualify: the hook must see the skip path's
    output apart from the residual branch's (PreAct and torchvision blocks add a bare ``x``)."""
    return [module.shortcut for module in net.modules() if isinstance(module, BasicBlock)]


def check_skip_gamma(gamma: float | None, net: nn.Module | None = None, model_name: str = "the model") -> None:
    """Refuse ``attack.skip_gamma`` outside ``[0, 1]``, or for a backbone without residual blocks."""
    if gamma is None:
        return
    if isinstance(gamma, bool) or not 0.0 <= float(gamma) <= 1.0:
        raise ConfigError("attack.skip_gamma", f"got {gamma!r}, must be in [0, 1] (0.5 in TrojanZoo), or null for "
                          "unscaled gradients")
    if net is not None and not residual_shortcuts(net):
        raise ConfigError("attack.skip_gamma", f"{model_name} has no residual block whose skip path can be scaled; "
                          "use model=resnet18 or model=resnet34, or set attack.skip_gamma=null")


class SkipGradientScale:
    """Multiplies by ``gamma`` the gradient that reaches a residual block's input through its skip
    connection, leaving the forward pass and the residual branch's gradient unchanged (TrojanZoo's
    "decay coefficient gamma = 0.5 for the gradient through skip connections", after Wu et al., "Skip
    Connections Matter", ICLR 2020).

    A forward hook on each block's ``shortcut`` returns a fresh view of its output and registers a
    backward hook on that view. The view matters: for an identity shortcut the output *is* the block's
    input, whose gradient also collects the residual branch's share; the view is a node of its own,
    so its hook sees (and scales) the skip path's share only. Nothing is hooked where no gradient
    flows (evaluation under ``no_grad``).
    """

    def __init__(self, gamma: float) -> None:
        self.gamma = float(gamma)
        self.handles: list[RemovableHandle] = []

    def _scale(self, _module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        if not output.requires_grad:
            return output
        skip = output.view_as(output)
        skip.register_hook(lambda grad: grad * self.gamma)
        return skip

    def install(self, net: nn.Module) -> None:
        """Hook every residual block's skip path of ``net`` (again after :meth:`remove`)."""
        self.remove()
        self.handles = [shortcut.register_forward_hook(self._scale) for shortcut in residual_shortcuts(net)]

    def remove(self) -> None:
        """Unhook, so the trained model's gradients (defenses, analyses) are the plain ones."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
