"""The Pixel paper's trigger inversion as its authors' released code runs it (``defense=pixel
defense.schedule=released``).

Tao et al., "Better Trigger Inversion Optimization in Backdoor Scanning", CVPR 2022: the objective is
§4's (Eq. 3, the perturbation of Eq. 4 or, by default here, Eq. 6 with ``maxp`` 1, the regulariser
of Eq. 5), the procedure the released code's. It differs from bdlab's engine
(:class:`~bdlab.inversion.engine.InversionEngine`, ``schedule: engine``) in five ways:

- both variables start from uniform noise in ``[0, 1)`` (the engine: 0 plus noise of 0.1);
- a fixed number of steps (1000), one mini-batch each, and no early stop; alpha goes x1.5 after
  ``patience`` (10) *steps* at the attack-success threshold and /1.5^1.5 after 10 below;
- a step's trigger becomes the new best only when it reaches the threshold on its mini-batch **and**
  both its regulariser (Eq. 5) and its #pixels are below the best's (:func:`release_accepts`);
- on a new best, the class's variables are reset to that trigger with every change below one
  level (1/255) zeroed, so the search goes on from the cut trigger;
- 50 optimisation images (the release's ``attack_size``).

Two choices are bdlab's, not the release's: a class that never reaches the threshold reports its
most successful trigger (the release returns an empty one, 0 pixels, which the anomaly index
would read as the most suspicious class), and #pixels counts the *net* changes of at least one
level, as everywhere in bdlab (the release also counts a pixel whose positive and negative
changes, each at least one level, cancel to less). With ``form: tanh`` the reset writes the
variable whose tanh gives the cut change (the release's optional tanh writes the change itself).

All classes of one model are one batch (one forward per step), as in the engine; a population
scan runs this engine one model at a time (``stackable`` False).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.inversion.engine import EpochScheduler, InversionResult, Schedule, Trigger
from bdlab.inversion.methods import PixelTrigger, above_level, changed_pixels, class_generator

#: the release's defaults where they differ from bdlab's engine: steps, alpha's patience (in steps),
#: optimisation images and the perturbation's form
RELEASE_STEPS = 1000
RELEASE_PATIENCE = 10
RELEASE_IMAGES = 50
RELEASE_FORM = "clip"


def release_accepts(success: Tensor, regulariser: Tensor, pixels: Tensor, best_regulariser: Tensor,
                    best_pixels: Tensor, threshold: float) -> Tensor:
    """``(K,)`` bool: the release's rule for a new best trigger, per class: the step's attack success
    reaches ``threshold`` and both its regulariser and its #pixels are strictly below the best's."""
    return (success >= threshold) & (regulariser < best_regulariser) & (pixels < best_pixels)


@dataclass
class ReleaseTracker:
    """Per class (``(K,)`` tensors): alpha and its counters, the best trigger by the release's rule, and
    the most successful one (for a class that never reaches the threshold)."""

    weight: Tensor
    up_count: Tensor
    down_count: Tensor
    best_regulariser: Tensor
    best_pixels: Tensor
    best_success: Tensor
    best_delta: Tensor
    reached: Tensor
    likeliest_success: Tensor
    likeliest_pixels: Tensor
    likeliest_delta: Tensor

    @classmethod
    def start(cls, classes: int, shape: tuple[int, ...], init_weight: float, device: torch.device) -> ReleaseTracker:
        def full(value: float, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.full((classes,), value, dtype=dtype, device=device)

        zeros = torch.zeros(classes, *shape, device=device)
        return cls(full(init_weight), full(0, torch.long), full(0, torch.long), full(float("inf")),
                   full(float("inf")), full(0.0), zeros, full(False, torch.bool), full(-1.0), full(float("inf")),
                   zeros.clone())

    def update(self, success: Tensor, regulariser: Tensor, pixels: Tensor, delta: Tensor, threshold: float,
               schedule: Schedule) -> Tensor:
        """Record one step's measures (of the trigger the step was taken with); return the classes whose
        trigger is their new best."""
        accepted = release_accepts(success, regulariser, pixels, self.best_regulariser, self.best_pixels, threshold)
        self.best_regulariser = torch.where(accepted, regulariser, self.best_regulariser)
        self.best_pixels = torch.where(accepted, pixels, self.best_pixels)
        self.best_success = torch.where(accepted, success, self.best_success)
        self.best_delta = torch.where(accepted[:, None, None, None], delta, self.best_delta)
        self.reached = self.reached | accepted
        likelier = success > self.likeliest_success
        self.likeliest_success = torch.where(likelier, success, self.likeliest_success)
        self.likeliest_pixels = torch.where(likelier, pixels, self.likeliest_pixels)
        self.likeliest_delta = torch.where(likelier[:, None, None, None], delta, self.likeliest_delta)
        hit = success >= threshold
        self.up_count = torch.where(hit, self.up_count + 1, 0)
        self.down_count = torch.where(hit, 0, self.down_count + 1)
        up = self.up_count >= schedule.patience
        down = ~up & (self.down_count >= schedule.patience)
        self.weight = torch.where(up, self.weight * schedule.up, torch.where(down, self.weight / schedule.down,
                                                                             self.weight))
        self.up_count = torch.where(up, 0, self.up_count)
        self.down_count = torch.where(down, 0, self.down_count)
        return accepted

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per class: the best trigger's perturbation, #pixels and attack success, or the most successful's
        where no trigger reached the threshold."""
        reached = self.reached
        return (torch.where(reached[:, None, None, None], self.best_delta, self.likeliest_delta),
                torch.where(reached, self.best_pixels, self.likeliest_pixels),
                torch.where(reached, self.best_success, self.likeliest_success))


class ReleasedPixelEngine:
    """Pixel's inversion on the released code's procedure (see the module docstring), every class of one
    model in one batch.

    Args:
        method: Pixel's trigger (its ``gamma`` and ``form``; the release's form is ``clip``).
        steps: optimiser steps, one mini-batch each (default 1000, the release's).
        batch_size: images per step and class (default 32; fewer when a class's pool is smaller).
        lr: Adam step (default: the method's, 0.1); betas (0.5, 0.9).
        threshold: attack success on the step's mini-batch at which a trigger counts (default 0.9).
        schedule: alpha's start, factors and ``patience`` in steps (default: Neural Cleanse's, patience
            10); its early stopping does not apply (the release has none).
        seed: the initial noise (per class) and the mini-batches.
    """

    #: a multi-model scan runs this engine one model at a time (it is not an InversionEngine)
    stackable = False

    def __init__(self, method: PixelTrigger, steps: int = RELEASE_STEPS, batch_size: int = 32,
                 lr: float | None = None, threshold: float = 0.9, schedule: Schedule | None = None,
                 seed: int = 0) -> None:
        check_at_least("defense.steps", steps, 1)
        check_at_least("defense.batch_size", batch_size, 1)
        check_range("defense.threshold", threshold, 0.0, 1.0, low_open=True)
        if lr is not None and not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        self.method, self.steps, self.batch_size = method, int(steps), int(batch_size)
        self.lr = method.lr if lr is None else float(lr)
        self.threshold, self.seed = float(threshold), int(seed)
        self.schedule = schedule or Schedule(patience=RELEASE_PATIENCE)

    def start(self, targets: Sequence[int], shape: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """``(K, C, H, W)`` each: the positive and negative variables' start, uniform in ``[0, 1)``, drawn
        from the seed and the class alone."""
        draws = []
        for target in targets:
            generator = class_generator(self.seed, target)
            draws.append((torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)))
        return torch.stack([p for p, _ in draws]), torch.stack([n for _, n in draws])

    def run(self, model: nn.Module, images: Tensor, labels: Tensor, targets: Sequence[int],
            sources: Sequence[int | None] | None = None, scheduler: EpochScheduler | None = None) -> InversionResult:
        """Invert a trigger for each of ``targets`` on float ``images`` ``(N, C, H, W)`` in ``[0, 1]``;
        ``sources[i]`` restricts target ``i``'s images to one class, None (default) uses every image not
        of the target. The release optimises every class at every step, so no ``scheduler`` is taken."""
        if scheduler is not None:
            raise ValueError("the released schedule steps every class each step; it takes no epoch scheduler")
        started = time.perf_counter()
        targets = [int(t) for t in targets]
        sources = list(sources) if sources is not None else [None] * len(targets)
        model.eval()
        device = next(model.parameters()).device
        images, labels = images.to(device), labels.to(device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        # channels-last convolutions take about half the time of the default layout on a CPU (the engine's finding)
        model.to(memory_format=torch.channels_last)
        try:
            tracker, loss = self._optimise(model, images, labels, targets, sources)
        finally:
            model.to(memory_format=torch.contiguous_format)
            for parameter in model.parameters():
                parameter.requires_grad_(True)
        delta, pixels, success = (part.cpu() for part in tracker.result())
        trigger = Trigger(torch.zeros(len(targets), 1, *delta.shape[2:]), torch.zeros_like(delta), delta)
        return InversionResult(targets, trigger, pixels, success, loss.cpu(), torch.full((len(targets),), self.steps),
                               tracker.reached.cpu(), time.perf_counter() - started, sources)

    def _optimise(self, model: nn.Module, images: Tensor, labels: Tensor, targets: list[int],
                  sources: list[int | None]) -> tuple[ReleaseTracker, Tensor]:
        method, device, classes = self.method, images.device, len(targets)
        target_tensor = torch.tensor(targets, device=device)
        source_tensor = torch.tensor([-1 if s is None else int(s) for s in sources], device=device)
        pools = torch.where(source_tensor[:, None] < 0, labels[None] != target_tensor[:, None],
                            labels[None] == source_tensor[:, None])  # (K, N): the images each class may use
        if not pools.any(1).all():
            raise ValueError("a class has no image to optimise its trigger on (no image of its source class, or "
                             "only images of the target)")
        batch = min(self.batch_size, int(pools.sum(1).min()))  # the release lowers its batch to a small set
        positive, negative = (part.to(device).requires_grad_(True) for part in self.start(targets, images.shape[1:]))
        # one Adam for all classes is K per-class ones: every class is stepped at every step
        optimizer = torch.optim.Adam([positive, negative], lr=self.lr, betas=(0.5, 0.9))
        tracker = ReleaseTracker.start(classes, tuple(images.shape[1:]), self.schedule.init, device)
        index, generator = list(range(classes)), torch.Generator().manual_seed(self.seed)
        loss = torch.full((classes,), float("nan"), device=device)
        for _ in range(self.steps):
            # a fresh random mini-batch of each class's pool: the release shuffles its set every step
            keys = torch.rand(classes, len(images), generator=generator).to(device).masked_fill(~pools, 2.0)
            x = images[keys.argsort(1)[:, :batch]]  # (K, B, C, H, W)
            variables = {"positive": list(positive.unbind()), "negative": list(negative.unbind())}
            logits = model(method.stamp(variables, index, x).flatten(0, 1)).view(classes, batch, -1)
            regulariser = method.regulariser(variables, index, x)
            total = method.attack_loss(logits, target_tensor).mean(1) + tracker.weight * regulariser
            with torch.no_grad():  # the trigger this step is measured with, before the step moves it
                up, down = above_level(method.change(positive)), above_level(method.change(negative))
            optimizer.zero_grad(set_to_none=True)
            total.sum().backward()
            optimizer.step()
            with torch.no_grad():
                success = (logits.argmax(2) == target_tensor[:, None]).float().mean(1)
                delta = above_level(up - down)
                accepted = tracker.update(success, regulariser.detach(), changed_pixels(delta), delta,
                                          self.threshold, self.schedule)
                # the release goes on from an accepted trigger, its changes below one level cut
                positive[accepted] = method.unchange(up[accepted])
                negative[accepted] = method.unchange(down[accepted])
                loss = total.detach()
        return tracker, loss
