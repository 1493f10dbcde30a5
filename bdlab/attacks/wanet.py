"""WaNet, the warping-based backdoor (Nguyen and Tran, ICLR 2021): the trigger is a small, smooth,
fixed geometric warp of the whole image instead of a pattern of pixels."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError, check_at_least
from bdlab.services import RunServices


def warping_field(grid_size: int, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
    """The normalised, upsampled warping field ``M / s`` of WaNet §3, shape ``(1, H, W, 2)`` with
    ``[..., 0]`` the horizontal and ``[..., 1]`` the vertical offset (``grid_sample``'s order).

    A ``k x k x 2`` grid of control offsets drawn uniformly from ``[-1, 1]``, divided by its mean
    absolute value (``psi``), then upsampled bicubically to the image size (``M = up(P)``)."""
    control = torch.rand(1, 2, grid_size, grid_size, generator=generator) * 2 - 1
    control = control / control.abs().mean()
    return F.interpolate(control, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1).contiguous()


def identity_grid(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """The sampling grid that leaves an image unchanged under ``grid_sample(align_corners=True)``, ``(1, H, W, 2)``."""
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, height, device=device),
                                torch.linspace(-1, 1, width, device=device), indexing="ij")
    return torch.stack((cols, rows), dim=-1)[None]


def warp(x: Tensor, field: Tensor, strength: float, grid_rescale: float = 1.0, noise: Tensor | None = None) -> Tensor:
    """Warp the float batch ``x`` ``(N, C, H, W)`` with ``field`` (:func:`warping_field`) at ``strength`` s.

    The official code's grid: ``clamp((identity + s * field / size) * grid_rescale, -1, 1)`` (the
    offsets in units of ``2 / size`` of the normalised ``[-1, 1]`` span, per axis), sampled
    bilinearly with ``align_corners=True``; ``s = 0`` with ``grid_rescale = 1`` is the identity.
    ``noise`` ``(N, H, W, 2)`` in ``[-1, 1]`` is added to that grid (over ``size`` again, then
    clamped) for the noise mode's cross samples."""
    n, _, height, width = x.shape
    field = field.to(x.device, x.dtype)
    per_axis = torch.tensor([1.0 / width, 1.0 / height], device=x.device, dtype=x.dtype)
    grid = ((identity_grid(height, width, x.device).to(x.dtype) + strength * field * per_axis) * grid_rescale)
    grid = grid.clamp(-1, 1).expand(n, -1, -1, -1)
    if noise is not None:
        grid = (grid + noise.to(x.device, x.dtype) * per_axis).clamp(-1, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class WaNet(Attack):
    """WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021).

    The trigger is a backward warp ``x' = W(x, M)`` of the whole image (bilinear sampling at the
    displaced positions). The field ``M`` (§3) is built once from the seed:

    - control grid: ``P = psi(rand_[-1,1](k, k, 2)) * s`` with ``psi(A) = A / mean(|A|)``, a
      ``k x k`` grid (``grid_size``) of random offsets of mean magnitude ``s`` (``strength``);
    - upsampling: ``M = up(P)``, bicubic interpolation to the image size;
    - clipping: the sampling grid ``identity + M`` is clamped to the image, so no sample point
      falls outside it.

    As in the official code, the offsets are divided by the image size (in the normalised
    ``[-1, 1]`` coordinates of ``grid_sample``) and the grid is multiplied by ``grid_rescale``.

    Training (§3, the "noise" mode), per batch in the training module: the flagged
    ``poison_rate`` share (relabelled to the target) is warped with ``M``; ``cross_ratio`` times
    as many other, unflagged samples of the batch become *cross* samples, warped with ``M`` plus a
    random field drawn uniformly from ``[-1, 1]`` per pixel (over the image size) and keeping
    their true labels, so the model learns the exact warp rather than any warp; the rest stay
    clean. ``cross_ratio = 0`` is the plain attack mode. The poisoned test and training sets are
    warped with ``M`` alone. The field is stored with the trojaned model.

    The paper's MNIST settings (and the official code's defaults): ``k = 4``, ``s = 0.5``,
    cross ratio 2, ``grid_rescale`` 1; poisoning rate 0.1.

    Args:
        grid_size: k, the control grid's side (2 to the image's side; default 4).
        strength: s, the warping strength (> 0; default 0.5).
        cross_ratio: cross (noise-mode) samples per backdoor sample in a batch (>= 0; default 2).
        grid_rescale: factor on the sampling grid (> 0; default 1, the official code's).
        poison_rate, target_class, seed, enhance, enhance_max_shrink: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "wanet"
    stamps_per_batch = True

    def __init__(self, grid_size: int = 4, strength: float = 0.5, cross_ratio: float = 2.0, grid_rescale: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_at_least("attack.grid_size", grid_size, 2)
        if int(grid_size) != grid_size:
            raise ConfigError("attack.grid_size", f"got {grid_size}, must be an integer")
        if not strength > 0:
            raise ConfigError("attack.strength", f"got {strength}, the warping strength s must be > 0")
        check_at_least("attack.cross_ratio", cross_ratio, 0.0)
        if not grid_rescale > 0:
            raise ConfigError("attack.grid_rescale", f"got {grid_rescale}, must be > 0")
        self.grid_size, self.strength = int(grid_size), float(strength)
        self.cross_ratio, self.grid_rescale = float(cross_ratio), float(grid_rescale)
        self.field: Tensor | None = None  # (1, H, W, 2), from setup on

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        height, width = data.size
        if self.grid_size > min(height, width):
            raise ConfigError("attack.grid_size", f"got {self.grid_size}, larger than the {height}x{width} images of "
                              f"{data.name}; use 2 to {min(height, width)}")
        self.field = warping_field(self.grid_size, (height, width), torch.Generator().manual_seed(self.seed))

    def warp(self, x: Tensor, noise: Tensor | None = None, strength: float | None = None) -> Tensor:
        """``x`` warped with this attack's field, at ``strength`` (default: the configured s; 0 is the
        identity), plus ``noise`` for cross samples."""
        if self.field is None:
            raise RuntimeError("WaNet's warping field is built in setup(data); call it first")
        return warp(x, self.field, self.strength if strength is None else strength, self.grid_rescale, noise)

    def apply(self, x: Tensor) -> Tensor:
        return self.warp(x)

    def cross_indices(self, is_poison: Tensor) -> Tensor:
        """The batch positions of the noise mode's cross samples: the first ``cross_ratio`` times the
        number of flagged samples (rounded) among the unflagged ones (the batch is shuffled)."""
        clean = (~is_poison).nonzero().flatten()
        count = min(int(self.cross_ratio * int(is_poison.sum()) + 0.5), len(clean))
        return clean[:count]

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(is_poison.any()):
            return x, labels
        x = x.clone()
        x[is_poison] = self.warp(x[is_poison])
        cross = self.cross_indices(is_poison.to(x.device))
        if len(cross):  # the global RNG, seeded by the training recipe, draws the noise
            noise = torch.rand(len(cross), *x.shape[2:], 2, device=x.device) * 2 - 1
            x[cross] = self.warp(x[cross], noise)
        return x, labels

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.field is None else {"field": self.field.detach().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.field = state["field"].detach().cpu().clone()
