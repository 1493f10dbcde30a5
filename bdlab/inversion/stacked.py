"""Many models of one architecture run as one: one call for a batch laid out model by model.

The engine's multi-model form (:meth:`~bdlab.inversion.engine.InversionEngine.run_many`) stamps the
triggers of every (model, class) slot on its images and sends the whole batch through
:class:`StackedModels` in one call, where a population scan would otherwise run each model's
inversion in turn. On a GPU the call is torch.func's model ensembling (``stack_module_state`` +
``functional_call`` + ``vmap``): the models' weights stacked, one kernel per layer for all of them.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

STRATEGIES = ("vmap", "loop")


def architecture(model: nn.Module) -> Hashable:
    """What models must share to be stacked: their class, and the name, shape, dtype and device of every
    parameter and buffer."""
    return (type(model), tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in model.state_dict().items()))


def default_strategy(device: torch.device) -> str:
    """``vmap`` on a GPU, ``loop`` on a CPU. On a 2-core CPU (one thread, LeNet, 8 models), vmap's forward and
    backward (grouped convolutions, their inputs moved between layouts) took 1.2x (32 images per model) to 1.8x
    (320) the CPU time of each model's own channels-last pass, and a Neural Cleanse run 1.8x that of the loop;
    there the gain is in running the rest of each step (stamping, losses, Adam, backward) once for all models."""
    return "vmap" if device.type == "cuda" else "loop"


class StackedModels(nn.Module):
    """``M`` models of one architecture as one module: ``forward`` takes a batch whose leading dimension
    is laid out model by model (equally many rows each: model 0's first) and returns each row's output
    from its own model.

    With ``strategy: vmap`` the weights are a detached copy, stacked along a new first dimension, and one
    vmapped ``functional_call`` runs every model at once; with ``loop`` each model runs its own rows in
    turn (the same arithmetic as a model run alone). Either way the models are read in whatever mode
    they are in, so the caller puts them in eval mode first (BatchNorm then uses its running
    statistics, and nothing updates them), and no gradient reaches their weights under vmap.

    Args:
        models: at least one model, all of one :func:`architecture`.
        strategy: ``vmap`` or ``loop``; default (None) :func:`default_strategy` for the models' device.
    """

    def __init__(self, models: Sequence[nn.Module], strategy: str | None = None) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("no model to stack")
        if len({architecture(model) for model in models}) > 1:
            raise ValueError("only models of one architecture (the same parameter and buffer names, shapes, "
                             "dtypes and device) can be stacked")
        self.device = next(iter(models[0].state_dict().values()), torch.empty(0)).device
        self.strategy = default_strategy(self.device) if strategy is None else strategy
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: must be one of {', '.join(STRATEGIES)}")
        self.count = len(models)
        self.models = tuple(models)  # a tuple: not submodules of this one
        if self.strategy == "vmap":
            parameters, buffers = stack_module_state(models)
            self.stacked_parameters = {k: v.detach() for k, v in parameters.items()}
            self.stacked_buffers = buffers
            # the architecture without weights: functional_call supplies every parameter and buffer
            self.skeleton = copy.deepcopy(models[0]).to("meta")

    def select(self, rows: Sequence[int]) -> StackedModels:
        """The models ``rows`` (positions in this stack), stacked in that order."""
        chosen = copy.copy(self)
        chosen.count, chosen.models = len(rows), tuple(self.models[row] for row in rows)
        if self.strategy == "vmap":
            index = torch.tensor(list(rows), device=self.device)
            chosen.stacked_parameters = {k: v.index_select(0, index) for k, v in self.stacked_parameters.items()}
            chosen.stacked_buffers = {k: v.index_select(0, index) for k, v in self.stacked_buffers.items()}
        return chosen

    def _one(self, parameters: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.skeleton, (parameters, buffers), (x,))

    def forward(self, x: Tensor) -> Tensor:
        if len(x) % self.count:
            raise ValueError(f"a stacked batch of {len(x)} rows does not split evenly over {self.count} models; "
                             "lay it out model by model, equally many rows each")
        per_model = x.view(self.count, len(x) // self.count, *x.shape[1:])
        if self.strategy == "loop":
            return torch.cat([model(rows) for model, rows in zip(self.models, per_model)])
        return vmap(self._one)(self.stacked_parameters, self.stacked_buffers, per_model).flatten(0, 1)
