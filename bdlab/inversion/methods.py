"""Trigger parametrisations and losses on the inversion engine: Neural Cleanse, TABOR, Pixel, UAP, CW-L0."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.errors import ConfigError, check_range
from bdlab.inversion.engine import InversionMethod, Trigger, Variables

# the smallest change of an 8-bit pixel: a perturbation below it is no change (Pixel paper, §4)
LEVEL = 1 / 255
_EPS = 1e-6


def class_generator(seed: int, target: int) -> torch.Generator:
    """The generator of one class's initial trigger: the same in the batched and sequential modes."""
    return torch.Generator().manual_seed(seed * 7919 + target)


def changed_pixels(delta: Tensor) -> Tensor:
    """``(K,)`` #pixels: positions ``(h, w)`` changed by at least one level in any channel (Pixel paper)."""
    return (delta.abs().amax(1) >= LEVEL - _EPS).flatten(1).sum(1).float()


def above_level(values: Tensor) -> Tensor:
    """``values`` with every change smaller than one level (1/255) in size set to exactly none."""
    return torch.where(values.abs() >= LEVEL - _EPS, values, torch.zeros_like(values))


def total_variation(x: Tensor) -> Tensor:
    """``(A,)`` anisotropic total variation of ``(A, C, H, W)``: summed absolute differences of neighbours."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).sum(1) + (x[..., 1:] - x[..., :-1]).abs().flatten(1).sum(1)


def squash(raw: Tensor) -> Tensor:
    """Neural Cleanse's map of an unbounded variable into ``[0, 1]``: ``tanh(raw) / (2 - eps) + 1/2``."""
    return torch.tanh(raw) / (2 - 1e-4) + 0.5


def unsquash(value: Tensor) -> Tensor:
    return torch.atanh(((value - 0.5) * (2 - 1e-4)).clamp(-1 + 1e-6, 1 - 1e-6))


class NeuralCleanseTrigger(InversionMethod):
    """Neural Cleanse (Wang et al., S&P 2019, Eq. 2-3): ``x' = (1 - m) x + m p`` with a mask ``m`` ``(H, W)``
    and a pattern ``p`` ``(C, H, W)``, both in ``[0, 1]`` through tanh; the regulariser and the size are
    the mask's L1 norm. Both start from seeded uniform noise, as in the released code; Adam step 0.1."""

    lr = 0.1

    def variables(self, targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> Variables:
        masks, patterns = [], []
        for target in targets:
            generator = class_generator(seed, target)
            masks.append(unsquash(torch.rand(1, *shape[1:], generator=generator)))
            patterns.append(unsquash(torch.rand(shape, generator=generator)))
        return {"mask": masks, "pattern": patterns}

    def parts(self, variables: Variables, index: Sequence[int]) -> tuple[Tensor, Tensor]:
        return (squash(torch.stack([variables["mask"][k] for k in index])),
                squash(torch.stack([variables["pattern"][k] for k in index])))

    def stamp(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        mask, pattern = self.parts(variables, index)
        return x + mask[:, None] * (pattern[:, None] - x)

    def regulariser(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        return self.parts(variables, index)[0].flatten(1).sum(1)

    def size(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return self.parts(variables, index)[0].flatten(1).sum(1)

    def trigger(self, variables: Variables, index: Sequence[int]) -> Trigger:
        mask, pattern = (part.detach().cpu() for part in self.parts(variables, index))
        return Trigger(mask, pattern, torch.zeros_like(pattern))


class TaborTrigger(NeuralCleanseTrigger):
    """TABOR (Guo et al., 2019, §4.2): Neural Cleanse's objective plus its regularisers, with TrojanZoo's
    weights (Table 21) and form:

    - R1, overly large triggers: ``l1 (|m|_1 + |m|_2^2) + l2 (|(1 - m) p|_1 + |(1 - m) p|_2^2)``;
    - R2, scattered triggers: ``l3 TV(m) + l4 TV(p)`` (total variation);
    - R3, blocking triggers: ``l5 CE(f((1 - m) x), y)`` (the image without the trigger keeps its label);
    - R4, overlaying triggers: ``l6 CE(f(m p), t)`` (the trigger alone is the target).

    Defaults ``l1..l6 = 1e-6, 1e-5, 1e-7, 1e-8, 0, 1e-2``.
    """

    def __init__(self, weights: Sequence[float] = (1e-6, 1e-5, 1e-7, 1e-8, 0.0, 1e-2)) -> None:
        if len(weights) != 6 or any(not w >= 0 for w in weights):
            raise ConfigError("defense.weights", f"got {list(weights)}, give six weights >= 0 (l1 ... l6)")
        self.weights = [float(w) for w in weights]

    def fixed_terms(self, model: nn.Module, variables: Variables, index: Sequence[int], x: Tensor,
                    labels: Tensor, targets: Tensor) -> Tensor:
        l1, l2, l3, l4, l5, l6 = self.weights
        mask, pattern = self.parts(variables, index)
        outside = (1 - mask) * pattern
        terms = l1 * (mask.flatten(1).sum(1) + mask.square().flatten(1).sum(1))
        terms = terms + l2 * (outside.abs().flatten(1).sum(1) + outside.square().flatten(1).sum(1))
        terms = terms + l3 * total_variation(mask) + l4 * total_variation(pattern)
        count, batch = labels.shape
        if l5:
            blocked = model((x * (1 - mask[:, None])).flatten(0, 1))
            terms = terms + l5 * F.cross_entropy(blocked, labels.flatten(), reduction="none").view(count, batch).mean(1)
        if l6:
            alone = model(mask * pattern)
            terms = terms + l6 * F.cross_entropy(alone, targets, reduction="none")
        return terms


class PixelTrigger(InversionMethod):
    """The Pixel paper's trigger (Tao et al., CVPR 2022, §4): no mask, two variables per pixel and channel,
    ``b_p`` for positive and ``b_n`` for negative change.

    ``form: tanh`` (default, Eq. 4, which the paper needs for trojaned models):
    ``x' = clip(x + (tanh(b_p) + 1)/2 - (tanh(b_n) + 1)/2)``; ``form: clip`` (Eq. 6):
    ``x' = clip(x + clip(b_p) - clip(b_n))``. The regulariser is Eq. 5,
    ``sum_hw max_c (tanh(b_p / gamma) + 1)/2 + sum_hw max_c (tanh(b_n / gamma) + 1)/2``; the size is
    the number of pixels changed by at least 1/255 in any channel. After every step, changes below
    1/255 are set to exactly none. Both variables start at 0 plus seeded noise of 0.1: every pixel
    half-way up both tails, changes that cancel, from which the optimisation keeps the few the
    attack needs (starting low in both tails instead, no change at all, found a 114-pixel trigger
    for BadNets' target where this start finds 6; see docs/inspection.md); Adam step 0.1.

    Args:
        gamma: the slope of the regulariser's tanh (default 10, the paper's); must be > 0.
        form: ``tanh`` (Eq. 4) or ``clip`` (Eq. 6).
    """

    lr = 0.1
    FORMS = ("tanh", "clip")

    def __init__(self, gamma: float = 10.0, form: str = "tanh") -> None:
        if not gamma > 0:
            raise ConfigError("defense.gamma", f"got {gamma}, must be > 0")
        if form not in self.FORMS:
            raise ConfigError("defense.form", f"got {form!r}, must be one of {', '.join(self.FORMS)}")
        self.gamma, self.form = float(gamma), form

    def variables(self, targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> Variables:
        positive, negative = [], []
        for target in targets:
            generator = class_generator(seed, target)
            positive.append(0.1 * torch.randn(shape, generator=generator))
            negative.append(0.1 * torch.randn(shape, generator=generator))
        return {"positive": positive, "negative": negative}

    def change(self, raw: Tensor) -> Tensor:
        return (torch.tanh(raw) + 1) / 2 if self.form == "tanh" else raw.clamp(0.0, 1.0)

    def unchange(self, change: Tensor) -> Tensor:
        """A variable whose :meth:`change` is ``change`` (in ``[0, 1]``); with tanh, no change is a finite
        variable far down the tail (about -7.25) rather than minus infinity."""
        if self.form == "clip":
            return change.clone()
        return torch.atanh((2 * change - 1).clamp(-1 + 1e-6, 1 - 1e-6))

    def delta(self, variables: Variables, index: Sequence[int]) -> Tensor:
        positive = torch.stack([variables["positive"][k] for k in index])
        negative = torch.stack([variables["negative"][k] for k in index])
        return self.change(positive) - self.change(negative)

    def stamp(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        return (x + self.delta(variables, index)[:, None]).clamp(0.0, 1.0)

    def regulariser(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        total = 0
        for name in ("positive", "negative"):
            raw = torch.stack([variables[name][k] for k in index])
            total = total + ((torch.tanh(raw / self.gamma) + 1) / 2).amax(1).flatten(1).sum(1)
        return total

    def project(self, variables: Variables, index: Sequence[int]) -> None:
        if self.form == "clip":  # a change in (0, 1/255) becomes none; with tanh, none means a very negative b
            for name in ("positive", "negative"):
                for k in index:
                    raw = variables[name][k]
                    raw.masked_fill_((raw > 0) & (raw < LEVEL), 0.0)

    def size(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return changed_pixels(self.exported(variables, index))

    def exported(self, variables: Variables, index: Sequence[int]) -> Tensor:
        """The perturbation with every change below one level removed (what #pixels counts)."""
        delta = self.delta(variables, index)
        return torch.where(delta.abs() >= LEVEL - _EPS, delta, torch.zeros_like(delta))

    def trigger(self, variables: Variables, index: Sequence[int]) -> Trigger:
        delta = self.exported(variables, index).detach().cpu()
        return Trigger(torch.zeros(delta.shape[0], 1, *delta.shape[2:]), torch.zeros_like(delta), delta)


class UAPTrigger(InversionMethod):
    """A targeted universal adversarial perturbation (the Pixel paper's App. B, Eq. 10-11): one ``delta``
    per class, ``|delta|_inf <= epsilon``, minimising the mean over images of ``min(CE, beta)``, as
    Eq. 11 writes it: a sample whose loss is above ``beta`` contributes a constant, so hopeless samples
    stop pulling and the perturbation serves those it can flip. No size objective: the most successful
    perturbation is kept. Starts from zero; Adam step ``epsilon / 10``; the size is the number of
    changed pixels.

    Args:
        epsilon: the L-infinity bound in ``[0, 1]`` pixel units (default 0.1; the paper: 8/255 on
            CIFAR-10 and ImageNet, 0.03 on SVHN).
        beta: the per-sample loss cap (default 10; a cap below the starting losses leaves no gradient).
    """

    regularised = False

    def __init__(self, epsilon: float = 0.1, beta: float = 10.0) -> None:
        check_range("defense.epsilon", epsilon, 0.0, 1.0, low_open=True)
        if not beta > 0:
            raise ConfigError("defense.beta", f"got {beta}, must be > 0")
        self.epsilon, self.beta = float(epsilon), float(beta)
        self.lr = self.epsilon / 10

    def variables(self, targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> Variables:
        return {"delta": [torch.zeros(shape) for _ in targets]}

    def delta(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return torch.stack([variables["delta"][k] for k in index])

    def stamp(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        return (x + self.delta(variables, index)[:, None]).clamp(0.0, 1.0)

    def attack_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return super().attack_loss(logits, targets).clamp(max=self.beta)

    def regulariser(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        return torch.zeros(len(index), device=x.device)

    def project(self, variables: Variables, index: Sequence[int]) -> None:
        for k in index:
            variables["delta"][k].clamp_(-self.epsilon, self.epsilon)

    def size(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return changed_pixels(self.delta(variables, index))

    def trigger(self, variables: Variables, index: Sequence[int]) -> Trigger:
        delta = self.delta(variables, index).detach().cpu()
        delta = torch.where(delta.abs() >= LEVEL - _EPS, delta, torch.zeros_like(delta))
        return Trigger(torch.zeros(delta.shape[0], 1, *delta.shape[2:]), torch.zeros_like(delta), delta)


class CWL0Trigger(InversionMethod):
    """Iterative CW-L0 adapted to triggers (the Pixel paper's App. A, Eq. 7-9; Carlini and Wagner 2017).

    ``x' = v (tanh(w) + 1)/2 + (1 - v) x`` with a 0/1 pixel mask ``v`` (all ones at the start) and
    free values ``w``; the attack loss is CW's margin ``max(max_{i != t} Z_i - Z_t, -kappa)`` and the
    regulariser the mean squared distance ``|x' - x|_2^2`` (lambda on the engine's schedule). After
    every epoch in which the trigger reaches the attack-success threshold, the ``prune_fraction`` of
    the still-allowed pixels with the smallest importance ``sum |g . delta|`` (over channels and up to
    64 of the class's images; ``g`` the gradient of the loss at ``x'``) leave ``v`` for good: the
    reduction is monotonic, as in CW. The size is the number of allowed pixels; the best trigger is
    the smallest that reached the threshold.

    Args:
        kappa: the margin's confidence (default 0).
        prune_fraction: share of the remaining pixels removed per pruning epoch (default 0.1).
    """

    lr = 0.05
    trainable = ("w",)  # "allowed", the 0/1 pixel mask, only ever shrinks by pruning

    def __init__(self, kappa: float = 0.0, prune_fraction: float = 0.1) -> None:
        if not kappa >= 0:
            raise ConfigError("defense.kappa", f"got {kappa}, must be >= 0")
        check_range("defense.prune_fraction", prune_fraction, 0.0, 1.0, low_open=True, high_open=True)
        self.kappa, self.prune_fraction = float(kappa), float(prune_fraction)

    def variables(self, targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> Variables:
        return {"w": [torch.zeros(shape) for _ in targets], "allowed": [torch.ones(1, *shape[1:]) for _ in targets]}

    def parts(self, variables: Variables, index: Sequence[int]) -> tuple[Tensor, Tensor]:
        values = (torch.tanh(torch.stack([variables["w"][k] for k in index])) + 1) / 2
        return torch.stack([variables["allowed"][k] for k in index]), values

    def stamp(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        allowed, values = self.parts(variables, index)
        return x + allowed[:, None] * (values[:, None] - x)

    def attack_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        target_logit = logits.gather(2, targets[:, None, None].expand(-1, logits.shape[1], 1)).squeeze(2)
        others = logits.scatter(2, targets[:, None, None].expand(-1, logits.shape[1], 1), float("-inf")).amax(2)
        return (others - target_logit).clamp(min=-self.kappa)

    def regulariser(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        allowed, values = self.parts(variables, index)
        return (allowed[:, None] * (values[:, None] - x)).square().flatten(2).sum(2).mean(1)

    def end_epoch(self, model: nn.Module, variables: Variables, index: Sequence[int], x: Tensor, labels: Tensor,
                  targets: Tensor, success: Tensor, threshold: float) -> None:
        for position, k in enumerate(index):
            if success[position] < threshold:
                continue
            images = x[labels != targets[position]][:64]
            with torch.enable_grad():
                stamped = self.stamp(variables, [k], images[None])[0].detach().requires_grad_(True)
                margin = self.attack_loss(model(stamped)[None], targets[position:position + 1]).sum()
                (grad,) = torch.autograd.grad(margin, stamped)
            importance = (grad * (stamped.detach() - images)).abs().sum((0, 1))  # (H, W)
            allowed = variables["allowed"][k]
            remaining = allowed[0].bool()
            drop = int(self.prune_fraction * int(remaining.sum()))
            if drop < 1:
                continue
            scores = torch.where(remaining, importance, torch.full_like(importance, float("inf")))
            allowed.view(-1)[scores.flatten().topk(drop, largest=False).indices] = 0.0

    def size(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return torch.stack([variables["allowed"][k].sum() for k in index])

    def trigger(self, variables: Variables, index: Sequence[int]) -> Trigger:
        allowed, values = (part.detach().cpu() for part in self.parts(variables, index))
        return Trigger(allowed, values, torch.zeros_like(values))
