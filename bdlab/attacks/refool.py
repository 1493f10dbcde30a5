"""Refool (Liu et al., ECCV 2020): reflections of other images as the backdoor trigger."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from bdlab.attacks.base import Attack, map_batches
from bdlab.datasets.base import DatasetSplits, to_float, to_uint8
from bdlab.errors import ConfigError, check_range
from bdlab.services import RunServices

REFLECTION_TYPES = ("same_depth", "out_of_focus", "ghost")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def reflection_kernels(kinds: Tensor, sigmas: Tensor, offsets: Tensor, ghost_alphas: Tensor, size: int) -> Tensor:
    """One ``(size, size)`` kernel ``k`` per sample for the three reflection types of Refool.

    ``kinds`` indexes :data:`REFLECTION_TYPES`: 0 same depth (``k`` = delta), 1 out of focus
    (``k`` = Gaussian of std ``sigma``), 2 ghost effect (``k`` = ``(1 - a) delta(0) + a delta(d)``,
    the reflection plus a copy shifted by ``d = offsets`` and attenuated to weight ``a``).
    Every kernel sums to 1, so the blending strength alone sets how visible the reflection is.
    """
    count, centre = len(kinds), size // 2
    kernels = torch.zeros(count, size, size)
    kernels[:, centre, centre] = 1.0
    coords = torch.arange(size, dtype=torch.float32) - centre
    radius2 = coords[None, :, None] ** 2 + coords[None, None, :] ** 2
    gauss = torch.exp(-radius2 / (2 * sigmas.clamp_min(1e-3)[:, None, None] ** 2))
    gauss = gauss / gauss.sum((1, 2), keepdim=True)
    blur = kinds == 1
    kernels[blur] = gauss[blur]
    ghost = (kinds == 2).nonzero().flatten()
    if len(ghost):
        kernels[ghost, centre, centre] = 1.0 - ghost_alphas[ghost]
        rows = centre + offsets[ghost, 0]
        cols = centre + offsets[ghost, 1]
        kernels[ghost, rows, cols] += ghost_alphas[ghost]
    return kernels


def blend_reflections(x: Tensor, reflections: Tensor, kernels: Tensor, strengths: Tensor,
                      gamma: float = 2.2) -> Tensor:
    """"Why is your Trojan NOT responding?" Eq. 2, ``x_b = x + x_R (*) k``, on float batches in ``[0, 1]``.

    The kernel is scaled by the blending strength ``beta`` and the clean (transmission) layer by
    ``1 - beta``, as Liu et al.'s released code does (``alpha_t = 1 - beta``), so the result
    stays in range: ``x_b = (1 - beta) x + beta (x_R (*) k)``. Blending happens in linear light
    (``gamma``, 2.2 like the released code; 1 blends the stored values directly).
    """
    count, channels, height, width = x.shape
    size = kernels.shape[-1]
    pad = size // 2
    padded = F.pad(reflections.pow(gamma), (pad, pad, pad, pad), mode="replicate")
    # one grouped convolution convolves every sample's channels with that sample's own kernel
    weight = kernels.to(x.device, x.dtype).repeat_interleave(channels, 0)[:, None]
    layer = F.conv2d(padded.reshape(1, count * channels, height + 2 * pad, width + 2 * pad), weight,
                     groups=count * channels).reshape(count, channels, height, width)
    beta = strengths.to(x.device, x.dtype).view(-1, 1, 1, 1)
    blended = (1 - beta) * x.pow(gamma) + beta * layer
    return blended.clamp(0.0, 1.0).pow(1.0 / gamma)


def load_reflection_folder(folder: str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """Every image of ``folder`` as float ``(N, C, H, W)``, resized to ``size``; ConfigError when unusable."""
    field = "attack.reflection_dir"
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(field, f"{str(root)!r} is not a directory of reflection images")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(field, f"{str(root)!r} holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})")
    height, width = size
    images = []
    for file in files:
        try:
            with Image.open(file) as opened:
                image = opened.convert("L" if channels == 1 else "RGB")
        except Exception as error:
            raise ConfigError(field, f"cannot read {str(file)!r} as an image ({error})") from error
        # a thumbnail smaller than the input would be upsampled into a smooth blob, not a reflection
        if image.height < height or image.width < width:
            raise ConfigError(field, f"{str(file)!r} is {image.width}x{image.height}, smaller than the "
                              f"{width}x{height} input; reflection images must be at least the input size")
        array = np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array.copy())
        images.append(tensor[None] if channels == 1 else tensor.permute(2, 0, 1))
    return torch.stack(images)


def _as_range(field: str, value: float | list[float], low: float, high: float) -> tuple[float, float]:
    pair = [value, value] if isinstance(value, (int, float)) else list(value)
    if len(pair) != 2 or pair[0] > pair[1]:
        raise ConfigError(field, f"got {value}, must be a number or [low, high] with low <= high")
    for item in pair:
        check_range(field, float(item), low, high)
    return float(pair[0]), float(pair[1])


class Refool(Attack):
    """Refool, the reflection backdoor (Liu et al., ECCV 2020; TrojanZoo Table 2 "Rb": ``r = x^r (*) k``;
    "Why is your Trojan NOT responding?" Eq. 2: ``x_b = x + x_R (*) k``, with three reflection types).

    Each poisoned image gets its own reflection image ``x_R`` from the pool and its own kernel
    ``k`` (:func:`reflection_kernels`): same-depth (``k`` = delta), out-of-focus (Gaussian blur,
    ``sigma`` drawn in a range) or ghost effect (a shifted, attenuated double). Blending follows
    :func:`blend_reflections`. The defaults are those of Liu et al.'s released ``blend_images``.

    Args:
        reflection_type: ``mixture`` (default), ``same_depth``, ``out_of_focus`` or ``ghost``.
            A mixture draws the ghost effect with probability ``ghost_rate`` and otherwise
            same-depth or out-of-focus with equal probability.
        ghost_rate: probability of the ghost effect in a mixture (default 0.49, released code).
        strength: blending strength ``beta``, a number or ``[low, high]`` drawn uniformly per
            image (default ``[0.05, 0.45]``, i.e. ``alpha_t = 1 - U(0.05, 0.45)``).
        sigma: Gaussian std of out-of-focus reflections in pixels, ``[low, high]`` (default ``[1, 5]``).
        ghost_offset: pixel shift of the ghost, ``[low, high]`` per axis (default ``[3, 8]``).
        ghost_alpha: weight of the shifted copy, ``[low, high]`` (default ``[0.15, 0.5]``).
        gamma: blending in linear light, 2.2 (default); 1 blends stored values.
        reflection_dir: a folder of reflection images (each at least the input size; resized to
            it). By default (null) the pool is drawn, seeded, from training images outside the
            target class that are not poisoned, since no external photo set exists offline.
        pool_size: number of reflection images in the pool (default 200, Liu et al.'s |R_adv|).
        clean_label: poison target-class images and keep their labels (default false: dirty-label).
        poison_rate, target_class, seed: see :class:`~bdlab.attacks.base.Attack`.

    Poisoned images are computed once per image set with a generator seeded by ``seed`` and
    the set's content, and kept as uint8 in the run's artifact cache (the resources given to
    :meth:`setup`; without them they are computed on every call). Test-time poisoning draws its
    reflections from the same attacker pool, which holds training images (or folder images),
    so it is disjoint from the test images being poisoned. ``apply`` on any other batch draws
    from a generator seeded in ``setup`` and advanced by each call.

    Not implemented: Liu et al.'s iterative selection of the most effective reflections
    (§3.2) and the released code's vignette mask on out-of-focus reflections; the pool is a
    seeded random draw.
    """

    name = "refool"

    def __init__(self, reflection_type: str = "mixture", ghost_rate: float = 0.49,
                 strength: float | list[float] = (0.05, 0.45), sigma: float | list[float] = (1.0, 5.0),
                 ghost_offset: int | list[int] = (3, 8), ghost_alpha: float | list[float] = (0.15, 0.5),
                 gamma: float = 2.2, reflection_dir: str | None = None, pool_size: int = 200,
                 clean_label: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reflection_type not in ("mixture", *REFLECTION_TYPES):
            raise ConfigError("attack.reflection_type", f"got {reflection_type!r}, must be one of "
                              f"{['mixture', *REFLECTION_TYPES]}")
        check_range("attack.ghost_rate", ghost_rate, 0.0, 1.0)
        self.strength = _as_range("attack.strength", strength, 0.0, 1.0)
        self.sigma = _as_range("attack.sigma", sigma, 0.0, 50.0)
        offset = _as_range("attack.ghost_offset", ghost_offset, 0.0, 64.0)
        self.ghost_offset = (int(offset[0]), int(offset[1]))
        self.ghost_alpha = _as_range("attack.ghost_alpha", ghost_alpha, 0.0, 1.0)
        check_range("attack.gamma", gamma, 0.0, 10.0, low_open=True)
        if pool_size < 1:
            raise ConfigError("attack.pool_size", f"got {pool_size}, must be >= 1")
        self.reflection_type, self.ghost_rate, self.gamma = reflection_type, ghost_rate, gamma
        self.reflection_dir, self.pool_size = reflection_dir, pool_size
        self.clean_label = clean_label
        self.pool: Tensor | None = None

    @property
    def display_name(self) -> str:
        name = "refool_clean_label" if self.clean_label else self.name
        return f"{name}+" if self.enhance else name

    @property
    def kernel_size(self) -> int:
        return 2 * max(math.ceil(3 * self.sigma[1]), self.ghost_offset[1]) + 1

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        if self.reflection_dir is not None:
            pool = load_reflection_folder(self.reflection_dir, data.channels, data.size)
        else:
            labels = data.train.labels
            candidates = torch.ones(len(labels), dtype=torch.bool)
            candidates[labels == self.target_class] = False
            candidates[self.poison_indices(labels)] = False
            candidates = candidates.nonzero().flatten()
            if len(candidates) == 0:
                raise ConfigError("attack.poison_rate", "leaves no unpoisoned non-target training image to reflect")
            generator = torch.Generator().manual_seed(self.seed + 1)
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[:self.pool_size]]
            pool = to_float(data.train.images[chosen.sort().values])
        if len(pool) > self.pool_size:
            generator = torch.Generator().manual_seed(self.seed + 1)
            pool = pool[torch.randperm(len(pool), generator=generator)[:self.pool_size]]
        height, width = data.size
        if self.kernel_size > 2 * min(height, width) + 1:
            raise ConfigError("attack.sigma", f"sigma {self.sigma} / ghost_offset {self.ghost_offset} need a "
                              f"{self.kernel_size}px kernel, too large for {height}x{width} images")
        self.pool = pool
        self._generator = torch.Generator().manual_seed(self.seed)

    def _draw(self, count: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Per-image reflection, type and kernel parameters."""
        uniform = lambda bounds: bounds[0] + (bounds[1] - bounds[0]) * torch.rand(count, generator=generator)
        if self.reflection_type == "mixture":
            ghost = torch.rand(count, generator=generator) < self.ghost_rate
            kinds = torch.where(ghost, 2, torch.randint(0, 2, (count,), generator=generator))
        else:
            kinds = torch.full((count,), REFLECTION_TYPES.index(self.reflection_type))
        low, high = self.ghost_offset
        return {
            "pool_index": torch.randint(0, len(self.pool), (count,), generator=generator),
            "kinds": kinds,
            "strengths": uniform(self.strength),
            "sigmas": uniform(self.sigma),
            "offsets": torch.randint(low, high + 1, (count, 2), generator=generator),
            "ghost_alphas": uniform(self.ghost_alpha),
        }

    def _reflect(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if self.pool is None:
            raise RuntimeError("Refool.setup(data) must run before poisoning")
        drawn = self._draw(len(x), generator)
        kernels = reflection_kernels(drawn["kinds"], drawn["sigmas"], drawn["offsets"], drawn["ghost_alphas"],
                                     self.kernel_size)
        reflections = self.pool[drawn["pool_index"]].to(x.device, x.dtype)
        return blend_reflections(x, reflections, kernels, drawn["strengths"], self.gamma)

    def apply(self, x: Tensor) -> Tensor:
        return self._reflect(x, self._generator)

    def _spec(self, digest: str) -> dict[str, Any]:
        pool_digest = hashlib.sha256(to_uint8(self.pool).numpy().tobytes()).hexdigest()
        return {"attack": "refool", "reflection_type": self.reflection_type, "ghost_rate": self.ghost_rate,
                "strength": self.strength, "sigma": self.sigma, "ghost_offset": self.ghost_offset,
                "ghost_alpha": self.ghost_alpha, "gamma": self.gamma, "seed": self.seed, "pool": pool_digest,
                "images": digest}

    def stamp(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """Poisoned uint8 copies of ``images``, computed once per image set and cached.

        The generator is seeded by ``seed`` and the images' content, so the training and
        test sets draw different, reproducible reflections.
        """
        digest = hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()

        def build() -> dict[str, Tensor]:
            generator = torch.Generator().manual_seed(self.seed ^ int(digest[:12], 16))
            return {"images": map_batches(lambda x, _: self._reflect(x, generator), images.cpu(), device)}

        if self._resources is None:
            return build()["images"].to(images.device)
        tensors, _ = self.resources.cache.get_or_build("poisoned/refool", self._spec(digest), build)
        return tensors["images"].to(images.device)
