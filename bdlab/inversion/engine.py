"""One trigger-inversion engine: the triggers of many target classes optimised as one batch.

Each target class ``k`` has its own trigger variables; one optimiser step stamps every active
class's trigger on the same mini-batch of clean images, runs the model once on the stacked
``(classes x images)`` batch, and minimises, for every class independently,

    attack loss of the stamped images towards ``k`` + lambda_k * regulariser_k

(Neural Cleanse, Wang et al. S&P 2019, Eq. 3; the Pixel paper's Eq. 3). Per class, the engine
keeps lambda on Neural Cleanse's schedule, the best trigger found so far (the smallest one whose
attack success on the optimisation images reaches the threshold, else the most successful), and
its own early stopping; a stopped class leaves the batch. ``mode: sequential`` runs the same code
one class at a time, for comparison. Methods (:class:`InversionMethod`) supply the trigger's
parametrisation, regulariser, size and constraints; a scheduler may choose which classes are
optimised in each epoch (K-Arm).

:meth:`InversionEngine.run_many` takes the same idea one level up, for a population scan: the
classes of ``M`` models of one architecture are ``M x K`` slots of one batch, and each step stamps,
scores and steps them all at once, the models run by one call (:class:`~bdlab.inversion.stacked.
StackedModels`: on a GPU their weights stacked and vmapped). Each slot keeps what a one-model run
gives its class: its start, optimiser state, lambda, best and early stop, and each model its own
scheduler, so the results are the one-model runs' up to the rounding of the stacked forward.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.inversion.stacked import StackedModels

Variables = dict[str, list[Tensor]]
MODES = ("batched", "sequential")


@dataclass(frozen=True)
class Trigger:
    """Recovered triggers of ``K`` classes in pixel space: ``stamp(x) = clip((1 - mask) x + mask pattern + delta)``.

    Mask-and-pattern methods (Neural Cleanse, TABOR) set ``mask`` ``(K, 1, H, W)`` and ``pattern``
    ``(K, C, H, W)`` with ``delta`` zero; additive methods (Pixel, UAP, CW) set ``delta``
    ``(K, C, H, W)`` with ``mask`` zero. ``footprint`` ``(K, 1, H, W)`` is how much each pixel is
    changed: the mask, or the largest absolute perturbation over channels.
    """

    mask: Tensor
    pattern: Tensor
    delta: Tensor

    @property
    def footprint(self) -> Tensor:
        return torch.maximum(self.mask, self.delta.abs().amax(1, keepdim=True))

    def stamp(self, x: Tensor, index: Tensor | int) -> Tensor:
        """Class ``index``'s trigger (one int, or one class per image) on float images ``x``."""
        mask = self.mask[index].to(x.device, x.dtype)
        pattern, delta = self.pattern[index].to(x.device, x.dtype), self.delta[index].to(x.device, x.dtype)
        return (x + mask * (pattern - x) + delta).clamp(0.0, 1.0)

    def select(self, index: Tensor) -> Trigger:
        return Trigger(self.mask[index], self.pattern[index], self.delta[index])

    @staticmethod
    def stack(triggers: Sequence[Trigger]) -> Trigger:
        return Trigger(*(torch.cat([getattr(t, part) for t in triggers]) for part in ("mask", "pattern", "delta")))


class InversionMethod(ABC):
    """A trigger parametrisation and its losses on the engine (Neural Cleanse, TABOR, Pixel, ...).

    Variables are per-class tensors (lists of ``K`` tensors) so that a class's optimiser state is
    its own and a class out of the batch is not stepped.
    """

    #: default step size of the engine's Adam optimiser for this method
    lr: float = 0.1
    #: names of the variables the optimiser steps (None: all of them; others are state the method updates)
    trainable: tuple[str, ...] | None = None
    #: the method has a size objective (lambda-scheduled); without one the most successful trigger is the best
    regularised: bool = True

    @abstractmethod
    def variables(self, targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> Variables:
        """Fresh trainable variables of each target class, initialised from ``seed`` and the class alone
        (so the batched and sequential modes start from the same triggers)."""

    @abstractmethod
    def stamp(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        """``(A, B, C, H, W)``: class ``index[a]``'s trigger on its images ``x[a]`` (``x`` is ``(A, B, C, H, W)``)."""

    @abstractmethod
    def regulariser(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        """``(A,)`` the size term lambda multiplies (``x``: the step's images, ``(A, B, C, H, W)``)."""

    def fixed_terms(self, model: nn.Module, variables: Variables, index: Sequence[int], x: Tensor,
                    labels: Tensor, targets: Tensor) -> Tensor:
        """``(A,)`` further loss terms with fixed weights (TABOR's) on the images ``x`` ``(A, B, C, H, W)``
        and their true ``labels`` ``(A, B)``; zero by default. In a multi-model run (:meth:`InversionEngine.
        run_many`), ``model`` sends each slot's rows to the slot's own model, so its input must be laid out
        slot by slot in ``index`` order, equally many rows per slot (as ``x.flatten(0, 1)`` is)."""
        return torch.zeros(len(index), device=x.device)

    def attack_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``(A, B)`` per-image loss of reaching the targets (cross-entropy by default)."""
        count, batch, classes = logits.shape
        return F.cross_entropy(logits.reshape(count * batch, classes), targets.repeat_interleave(batch),
                               reduction="none").view(count, batch)

    @abstractmethod
    def size(self, variables: Variables, index: Sequence[int]) -> Tensor:
        """``(A,)`` the reported trigger size (mask L1 norm, or number of perturbed pixels)."""

    def project(self, variables: Variables, index: Sequence[int]) -> None:
        """Restore the variables' constraints after a step (default: none)."""

    def end_epoch(self, model: nn.Module, variables: Variables, index: Sequence[int], x: Tensor, labels: Tensor,
                  targets: Tensor, success: Tensor, threshold: float) -> None:
        """Work after each epoch (CW's pruning); default none. ``index`` are the slots of one ``model``
        (a multi-model run calls it once per model)."""

    @abstractmethod
    def trigger(self, variables: Variables, index: Sequence[int]) -> Trigger:
        """The pixel-space triggers of classes ``index`` (detached, on the CPU)."""


@dataclass
class Schedule:
    """Neural Cleanse's lambda schedule and early stopping (Wang et al. 2019, released code), per class.

    lambda starts at ``init``; after ``patience`` epochs in a row with attack success >= the
    threshold it is multiplied by ``up`` (1.5), after ``patience`` epochs below it divided by
    ``down`` (1.5^1.5). A class stops once lambda has gone both up and down and its best size
    has not improved for ``early_stop_patience`` epochs.
    """

    init: float = 1e-3
    up: float = 1.5
    down: float = 1.5 ** 1.5
    patience: int = 5
    early_stop_patience: int = 25

    def __post_init__(self) -> None:
        if not self.init >= 0:
            raise ConfigError("defense.init_weight", f"got {self.init}, a regulariser weight must be >= 0")
        for field, factor in (("up", self.up), ("down", self.down)):
            if not factor > 1:
                raise ConfigError(f"defense.{field}", f"got {factor}, lambda's {field} factor must be > 1")
        check_at_least("defense.patience", self.patience, 1)
        check_at_least("defense.early_stop_patience", self.early_stop_patience, 1)


@dataclass
class ClassState:
    """What the engine tracks for one target class."""

    weight: float
    up_count: int = 0
    down_count: int = 0
    went_up: bool = False
    went_down: bool = False
    stale: int = 0
    epochs: int = 0
    stopped: bool = False
    best_size: float = math.inf
    best_success: float = -1.0
    best_reached: bool = False
    best_loss: float = math.inf
    best: Trigger | None = None
    last_loss: float = math.nan


@dataclass
class InversionResult:
    """The best trigger of each target class and how it was found."""

    targets: list[int]
    trigger: Trigger
    size: Tensor
    success: Tensor
    loss: Tensor
    epochs: Tensor
    reached: Tensor
    seconds: float
    sources: list[int | None] = field(default_factory=list)


class InversionEngine:
    """Optimises the triggers of many target classes as one batch (see the module docstring).

    Args:
        method: the trigger parametrisation and losses.
        epochs: passes over the optimisation images (each a step per mini-batch); the budget.
        batch_size: optimisation images per step (each stamped with every active class's trigger).
        lr: Adam step size (default: the method's); Adam's betas are Neural Cleanse's (0.5, 0.9).
        threshold: attack success a trigger must reach on the optimisation images to count as found.
        schedule: lambda's schedule and early stopping (:class:`Schedule`).
        mode: ``batched`` (default) or ``sequential`` (the same code, one class at a time).
        restarts: independent starts per class, optimised side by side in the batch; a class keeps its
            best (the Pixel paper takes the smallest of 3 runs for class distances).
        seed: initial triggers and the image order.
    """

    #: :meth:`run_many` inverts many models at once (a population scan checks this before stacking models)
    stackable = True

    def __init__(self, method: InversionMethod, epochs: int = 50, batch_size: int = 32, lr: float | None = None,
                 threshold: float = 0.99, schedule: Schedule | None = None, mode: str = "batched",
                 seed: int = 0, restarts: int = 1) -> None:
        check_at_least("defense.epochs", epochs, 1)
        check_at_least("defense.restarts", restarts, 1)
        check_at_least("defense.batch_size", batch_size, 1)
        check_range("defense.threshold", threshold, 0.0, 1.0, low_open=True)
        if mode not in MODES:
            raise ConfigError("defense.mode", f"got {mode!r}, must be one of {', '.join(MODES)}")
        if lr is not None and not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        self.method, self.epochs, self.batch_size = method, int(epochs), int(batch_size)
        self.lr = method.lr if lr is None else float(lr)
        self.threshold, self.schedule, self.mode, self.seed = float(threshold), schedule or Schedule(), mode, seed
        self.restarts = int(restarts)

    def run(self, model: nn.Module, images: Tensor, labels: Tensor, targets: Sequence[int],
            sources: Sequence[int | None] | None = None, scheduler: EpochScheduler | None = None) -> InversionResult:
        """Invert a trigger for each of ``targets`` on float ``images`` ``(N, C, H, W)`` in ``[0, 1]``.

        ``sources[i]`` restricts target ``i``'s images to one source class (a class pair);
        None (default) uses every image not of the target class (a universal trigger).
        """
        targets = [int(t) for t in targets]
        sources = list(sources) if sources is not None else [None] * len(targets)
        started = time.perf_counter()
        if self.mode == "sequential" and len(targets) > 1:
            parts = [self._run([model], images, labels, [t], [s], [scheduler])[0] for t, s in zip(targets, sources)]
            result = InversionResult(targets, Trigger.stack([p.trigger for p in parts]),
                                     *(torch.cat([getattr(p, name) for p in parts])
                                       for name in ("size", "success", "loss", "epochs", "reached")),
                                     seconds=0.0, sources=sources)
        else:
            result = self._run([model], images, labels, targets, sources, [scheduler])[0]
        result.seconds = time.perf_counter() - started
        return result

    def run_many(self, models: Sequence[nn.Module], images: Tensor, labels: Tensor, targets: Sequence[int],
                 sources: Sequence[int | None] | None = None,
                 schedulers: Sequence[EpochScheduler | None] | None = None) -> list[InversionResult]:
        """:meth:`run` for each of ``models`` (one architecture, one device), all of them at once in the
        batched mode: per step one call of every model (:class:`~bdlab.inversion.stacked.StackedModels`) on
        the triggers of all its active classes, one loss, one backward and one optimiser step.
        ``schedulers[m]`` (default none) is model ``m``'s own. Each result's ``seconds`` is the whole run's
        wall time divided by the number of models. The sequential mode runs the models one after another,
        each timed on its own."""
        models = list(models)
        schedulers = list(schedulers) if schedulers is not None else [None] * len(models)
        if len(schedulers) != len(models):
            raise ValueError(f"{len(models)} models but {len(schedulers)} schedulers; give one per model")
        if self.mode == "sequential" or len(models) == 1:
            return [self.run(model, images, labels, targets, sources, scheduler)
                    for model, scheduler in zip(models, schedulers)]
        targets = [int(t) for t in targets]
        sources = list(sources) if sources is not None else [None] * len(targets)
        started = time.perf_counter()
        results = self._run(models, images, labels, targets, sources, schedulers)
        share = (time.perf_counter() - started) / len(models)
        for result in results:
            result.seconds = share
        return results

    def _run(self, models: list[nn.Module], images: Tensor, labels: Tensor, targets: list[int],
             sources: list[int | None], schedulers: list[EpochScheduler | None]) -> list[InversionResult]:
        for model in models:
            model.eval()
        device = next(models[0].parameters()).device
        images, labels = images.to(device), labels.to(device)
        method, classes = self.method, len(targets)
        slots = classes * self.restarts  # per model
        # slot k + r * classes of model m (at m * slots + ...) is restart r of class k, started from the seed of r
        # alone, so that every model's slots start as a one-model run's
        parts = [method.variables(targets, tuple(images.shape[1:]), self.seed + 1009 * r)
                 for _ in models for r in range(self.restarts)]
        trainable = method.trainable or tuple(parts[0])
        variables = {name: [v.to(device).requires_grad_(name in trainable) for part in parts for v in part[name]]
                     for name in parts[0]}
        # one Adam for every slot is one per slot: each variable keeps its own moments and step count, and a slot out
        # of the batch has no gradient, which Adam skips; the multi-tensor (foreach) step gives the per-tensor step's
        # figures bit for bit, at a tenth of its time for 20-160 small variables on a CPU
        optimizer = torch.optim.Adam([variables[name][k] for k in range(len(models) * slots) for name in trainable],
                                     lr=self.lr, betas=(0.5, 0.9), foreach=True)
        target_tensor = torch.tensor(targets * self.restarts * len(models), device=device)
        source_tensor = torch.tensor([-1 if s is None else int(s) for s in sources] * self.restarts * len(models),
                                     device=device)
        states = [ClassState(self.schedule.init if method.regularised else 0.0) for _ in range(len(models) * slots)]
        stacked = StackedModels(models) if len(models) > 1 else None
        for model in models:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            # channels-last convolutions take about half the time of the default layout on a CPU (LeNet, 320 images)
            model.to(memory_format=torch.channels_last)
        finished = [False] * len(models)
        try:
            for epoch in range(self.epochs):
                active = []
                for m, scheduler in enumerate(schedulers):
                    own = states[m * slots:(m + 1) * slots]
                    live = [k for k, state in enumerate(own) if not state.stopped]
                    # a model is done once its scheduler chooses nothing, as a one-model run ends there
                    chosen = [] if finished[m] else scheduler.select(epoch, live, own) if scheduler is not None \
                        else live
                    finished[m] = not chosen
                    active.append([m * slots + k for k in chosen])
                if all(finished):
                    break
                self._epoch(models, stacked, images, labels, variables, optimizer, active, target_tensor,
                            source_tensor, states, epoch)
        finally:
            for model in models:
                model.to(memory_format=torch.contiguous_format)
                for parameter in model.parameters():
                    parameter.requires_grad_(True)
        return [self._result(targets, sources, variables, states[m * slots:(m + 1) * slots], m * slots)
                for m in range(len(models))]

    def _pools(self, labels: Tensor, targets: Tensor, sources: Tensor) -> Tensor:
        """``(K, N)``: the images each class is optimised on: its source class, or every other class."""
        universal = sources[:, None] < 0
        return torch.where(universal, labels[None] != targets[:, None], labels[None] == sources[:, None])

    def _epoch(self, models: list[nn.Module], stacked: StackedModels | None, images: Tensor, labels: Tensor,
               variables: Variables, optimizer: torch.optim.Optimizer, active: list[list[int]],
               targets: Tensor, sources: Tensor, states: list[ClassState], epoch: int) -> None:
        """``ceil(N / batch_size)`` steps; at each, every active class of every model gets the next ``batch_size``
        images of its own pool (in one order drawn per epoch from the seed, so both modes, and a model run alone
        or with others, see the same batches)."""
        method, device = self.method, images.device
        groups = [(m, chosen) for m, chosen in enumerate(active) if chosen]
        width = max(len(chosen) for _, chosen in groups)
        # the stacked forward runs every model on equally many slots, so a model with fewer active classes repeats
        # its first one; a repeat's loss is masked to exactly 0 (no gradient, no step, no score). Padding, rather
        # than grouping the models by their counts, keeps one forward per step and wastes little: early stops are
        # few and spread out, and K-Arm's bandit picks one class per model
        slot_list = [k for _, chosen in groups for k in chosen + chosen[:1] * (width - len(chosen))]
        positions = [g * width + i for g, (_, chosen) in enumerate(groups) for i in range(len(chosen))]
        stepped = [slot_list[p] for p in positions]
        forward = models[groups[0][0]] if len(groups) == 1 else \
            stacked if len(groups) == len(models) else stacked.select([m for m, _ in groups])
        real = None if len(stepped) == len(slot_list) else \
            torch.zeros(len(slot_list), dtype=torch.bool, device=device).index_fill_(
                0, torch.tensor(positions, device=device), True)
        index = torch.tensor(slot_list, device=device)
        generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(len(images), generator=generator).to(device)
        pools = self._pools(labels[order], targets[index], sources[index])  # (A, N) in epoch order
        queues = [order[pool] for pool in pools]
        if any(len(queue) == 0 for queue in queues):
            raise ValueError("a class has no image to optimise its trigger on (no image of its source class, or "
                             "only images of the target)")
        steps = max(1, math.ceil(len(images) / self.batch_size))
        hits = torch.zeros(len(slot_list), device=device)
        seen = torch.zeros(len(slot_list), device=device)
        losses = torch.zeros(len(slot_list), device=device)
        for step in range(steps):
            ahead = torch.arange(step * self.batch_size, (step + 1) * self.batch_size, device=device)
            batch = torch.stack([queue[ahead % len(queue)] for queue in queues])  # (A, B), cycling short pools
            x, y = images[batch], labels[batch]
            stamped = method.stamp(variables, slot_list, x)
            logits = forward(stamped.flatten(0, 1)).view(len(slot_list), batch.shape[1], -1)
            weights = torch.tensor([states[k].weight for k in slot_list], device=device)
            loss = method.attack_loss(logits, targets[index]).mean(1) + \
                weights * method.regulariser(variables, slot_list, x) + \
                method.fixed_terms(forward, variables, slot_list, x, y, targets[index])
            if real is not None:
                loss = torch.where(real, loss, torch.zeros_like(loss))
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            with torch.no_grad():
                method.project(variables, stepped)
                hits += (logits.argmax(2) == targets[index][:, None]).float().sum(1)
                seen += batch.shape[1]
                losses += loss.detach()
        success = hits / seen
        with torch.no_grad():
            sizes = method.size(variables, stepped)
            trigger = method.trigger(variables, stepped)
        for i, (position, k) in enumerate(zip(positions, stepped)):
            self._update(states[k], float(success[position]), float(sizes[i]), trigger.select(torch.tensor([i])),
                         float(losses[position]) / steps)
        with torch.no_grad():  # after the best-so-far update, which scores the trigger the epoch used
            for g, (m, chosen) in enumerate(groups):
                own = slice(g * width, g * width + len(chosen))
                method.end_epoch(models[m], variables, chosen, images, labels, targets[index[own]], success[own],
                                 self.threshold)

    def _update(self, state: ClassState, success: float, size: float, trigger: Trigger, loss: float) -> None:
        """Best-so-far, Neural Cleanse's lambda schedule and early stopping for one class after an epoch."""
        schedule, reached = self.schedule, success >= self.threshold
        state.epochs += 1
        state.last_loss = loss
        improved = (reached and (not state.best_reached or size < state.best_size)) or \
            (not reached and not state.best_reached and success > state.best_success)
        if not self.method.regularised:  # no size objective: the most successful trigger, then the lowest loss
            improved = success > state.best_success or (success == state.best_success and loss < state.best_loss)
        if improved:
            previous = state.best_size
            state.best, state.best_size, state.best_success, state.best_reached = trigger, size, success, reached
            state.best_loss = loss
            state.stale = 0 if (reached and size < previous) or not math.isfinite(previous) else state.stale + 1
        else:
            state.stale += 1
        if not self.method.regularised:
            return
        if reached:
            state.up_count, state.down_count = state.up_count + 1, 0
        else:
            state.up_count, state.down_count = 0, state.down_count + 1
        if state.up_count >= schedule.patience:
            state.up_count, state.weight, state.went_up = 0, state.weight * schedule.up, True
        elif state.down_count >= schedule.patience:
            state.down_count, state.weight, state.went_down = 0, state.weight / schedule.down, True
        if state.went_up and state.went_down and state.stale >= schedule.early_stop_patience:
            state.stopped = True

    def _result(self, targets: list[int], sources: list[int | None], variables: Variables,
                states: list[ClassState], first: int) -> InversionResult:
        """One model's result from its ``states``, the slots from ``first`` on."""
        with torch.no_grad():  # a class never stepped keeps its start
            fallback = self.method.trigger(variables, list(range(first, first + len(states))))
        for k, state in enumerate(states):
            if state.best is None:
                state.best = fallback.select(torch.tensor([k]))
        classes = len(targets)
        # of a class's restarts, the best: a found trigger before an unfound one, then the smaller, then the more successful
        chosen = [min((states[k + r * classes] for r in range(self.restarts)),
                      key=lambda s: (not s.best_reached, s.best_size if s.best_reached else -s.best_success))
                  for k in range(classes)]
        return InversionResult(
            targets, Trigger.stack([s.best for s in chosen]),
            torch.tensor([s.best_size if math.isfinite(s.best_size) else math.nan for s in chosen]),
            torch.tensor([max(s.best_success, 0.0) for s in chosen]),
            torch.tensor([s.last_loss for s in chosen]),
            torch.tensor([sum(states[k + r * classes].epochs for r in range(self.restarts)) for k in range(classes)]),
            torch.tensor([s.best_reached for s in chosen]),
            seconds=0.0, sources=sources)


class EpochScheduler(ABC):
    """Chooses which live classes the engine optimises in an epoch (K-Arm's bandit)."""

    @abstractmethod
    def select(self, epoch: int, live: list[int], states: list[ClassState]) -> list[int]:
        """The classes to optimise in ``epoch``, among the ``live`` (not stopped) ones."""
