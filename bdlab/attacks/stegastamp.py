"""StegaStamp-style networks (Tancik et al., CVPR 2020), sized for small images, and the LightningModule
that trains them together: the trigger generator of ISSBA (Li et al., ICCV 2021, §4.2 and §5.1).

- :class:`StegaEncoder`: a U-Net (two stride-2 levels, skip connections) that takes an image and a bit
  string and returns a residual; :meth:`StegaEncoder.encode` adds it and clamps to ``[0, 1]``.
- :class:`StegaDecoder`: a small convolutional network that reads the bit logits back from an image.
- :class:`StegaCritic`: StegaStamp's WGAN critic (weight clipping), telling encoded images from clean ones.
- :class:`StegaStampModule`: the four losses of StegaStamp / ISSBA §5.1 with their scaling factors
  (residual L2, perceptual, critic, bit cross-entropy), the image losses ramped up over training, the
  critic with its own optimiser (Lightning manual optimisation).

Images are float ``(N, C, H, W)`` in ``[0, 1]``; bits are float ``(N, bits)`` in ``{0, 1}``.
"""

from __future__ import annotations

import math
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio

from bdlab.datasets.base import to_float
from bdlab.errors import ConfigError
from bdlab.training.loader import BatchedModule, TensorBatches

#: the smallest image side the encoder takes (two stride-2 levels leave a 2x2 bottleneck)
MIN_SIZE = 8
#: pixels per carried bit: the encoder carries at most ``H * W // PIXELS_PER_BIT`` bits (98 at 28x28, 128 at 32x32)
PIXELS_PER_BIT = 8
#: WGAN weight clipping of the critic (StegaStamp's released code)
CRITIC_CLIP = 0.01
PERCEPTUAL = ("ssim", "lpips")


def capacity(size: tuple[int, int]) -> int:
    """The most bits the encoder carries in images of ``size`` (H, W): one per :data:`PIXELS_PER_BIT` pixels."""
    return int(size[0]) * int(size[1]) // PIXELS_PER_BIT


def quantise(x: Tensor) -> Tensor:
    """``x`` rounded to the 256 grey levels it is stored in, with a straight-through gradient."""
    return x + (torch.round(x * 255.0) / 255.0 - x).detach()


def _window_matrix(length: int, kernel: int = 11, sigma: float = 1.5) -> Tensor:
    """``(length, length)``: the normalised 1-D Gaussian window around each position, with the image
    reflected at its borders (``F.pad(mode="reflect")``) folded in, so ``M @ x`` is the padded blur."""
    taps = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    gauss = torch.exp(-0.5 * (taps / sigma) ** 2)
    gauss = gauss / gauss.sum()
    pad = (kernel - 1) // 2
    matrix = torch.zeros(length, length, dtype=torch.float64)
    for i in range(length):
        for k in range(kernel):
            j = i + k - pad
            j = -j if j < 0 else 2 * (length - 1) - j if j > length - 1 else j
            matrix[i, j] += gauss[k]
    return matrix.float()


class SSIM(nn.Module):
    """SSIM (Wang et al. 2004) of float images in ``[0, 1]``: the value of torchmetrics'
    ``structural_similarity_index_measure(x, y, data_range=1.0)`` (Gaussian window 11, sigma 1.5, k1 0.01,
    k2 0.03, reflect padding, mean over the whole map), with the separable window applied as two matrix
    products. torchmetrics' grouped convolution has a slow CPU backward (~130 ms per batch of 32 28x28
    images, 50x this), and the encoder's loss backpropagates through SSIM at every step."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("rows", _window_matrix(size[0]), persistent=False)
        self.register_buffer("cols", _window_matrix(size[1]).T.contiguous(), persistent=False)

    def blur(self, x: Tensor) -> Tensor:
        return self.rows @ x @ self.cols

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        mu_x, mu_y = self.blur(x), self.blur(y)
        mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
        var_x = (self.blur(x * x) - mu_xx).clamp_min(0.0)
        var_y = (self.blur(y * y) - mu_yy).clamp_min(0.0)
        cov = self.blur(x * y) - mu_xy
        ssim = ((2 * mu_xy + c1) * (2 * cov + c2)) / ((mu_xx + mu_yy + c1) * (var_x + var_y + c2))
        return ssim.mean()


def _block(inputs: int, outputs: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU (batch norm makes the bits readable within a few
    hundred steps; without it the bit loss stays at log 2 for longer than the CPU budget)."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True),
                         nn.Conv2d(outputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=True))


def _down(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(outputs),
            nn.ReLU(inplace=True)]


class StegaEncoder(nn.Module):
    """A U-Net style encoder (StegaStamp's, two levels instead of four, batch norm): the bits go through a
    dense layer to a ``secret_channels`` map at a quarter of the resolution, are upsampled to the image
    size and concatenated with the image. The residual is ``residual_scale * tanh(u + g * p)``: ``u`` the
    U-Net's output, ``p`` a full-resolution pattern made from the bits by a dense layer, ``g`` a
    per-pixel gate in ``(0, 1)`` the U-Net computes from the image. Without the shortcut ``p`` the bits
    stay unreadable for longer than a CPU budget allows; without the gate the residual is mostly one
    fixed pattern (75% of its energy common to all images on MNIST, 27% with the gate).

    Args:
        channels, size: the images' channels and (H, W); any size of at least :data:`MIN_SIZE` works (the
            decoder path is resized to each skip connection's size).
        bits: length of the bit strings.
        width: channels of the first level (the second has 2x, the bottleneck 4x).
        residual_scale: the largest change of a pixel (``[0, 1]`` units).
        gate_floor: the least the gate lets through, ``g`` in ``[gate_floor, 1]``: 1 makes ``p`` one
            pattern for every image, 0 lets the image decide everywhere.
    """

    def __init__(self, channels: int, size: tuple[int, int], bits: int, width: int = 16,
                 residual_scale: float = 0.2, gate_floor: float = 0.0, secret_channels: int = 4) -> None:
        super().__init__()
        height, width_px = int(size[0]), int(size[1])
        if min(height, width_px) < MIN_SIZE:
            raise ValueError(f"images of {height}x{width_px} are below the encoder's {MIN_SIZE}x{MIN_SIZE}")
        self.size, self.bits, self.residual_scale = (height, width_px), int(bits), float(residual_scale)
        self.gate_floor = float(gate_floor)
        self.secret_shape = (secret_channels, math.ceil(height / 4), math.ceil(width_px / 4))
        self.secret = nn.Linear(bits, math.prod(self.secret_shape))
        inputs = channels + secret_channels
        self.down1 = _block(inputs, width)
        self.down2 = _block(width, 2 * width)
        self.bottom = _block(2 * width, 4 * width)
        self.up2 = _block(4 * width + 2 * width, 2 * width)
        self.up1 = _block(2 * width + width + inputs, width)
        self.out = nn.Conv2d(width, channels, 1)
        # a dense shortcut from the bits to a full-resolution pattern, added to the U-Net's output through a
        # per-pixel gate the U-Net computes from the image: the decoder finds the bits within ~150 steps
        # instead of staying at chance for the whole CPU budget, and the gate (open at the start) learns
        # where each image can hide the pattern, which keeps the trigger sample-specific
        self.pattern = nn.Linear(bits, channels * height * width_px)
        self.gate = nn.Conv2d(width, 1, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, 2.0)

    def residual(self, x: Tensor, bits: Tensor) -> Tensor:
        secret = self.secret(bits * 2 - 1).view(len(x), *self.secret_shape)
        inputs = torch.cat([x - 0.5, F.interpolate(secret, size=x.shape[-2:], mode="nearest")], 1)
        level1 = self.down1(inputs)
        level2 = self.down2(F.max_pool2d(level1, 2, ceil_mode=True))
        bottom = self.bottom(F.max_pool2d(level2, 2, ceil_mode=True))
        up2 = self.up2(torch.cat([F.interpolate(bottom, size=level2.shape[-2:], mode="nearest"), level2], 1))
        up1 = self.up1(torch.cat([F.interpolate(up2, size=level1.shape[-2:], mode="nearest"), level1, inputs], 1))
        pattern = self.pattern(bits * 2 - 1).view(len(x), -1, *x.shape[-2:])
        gate = self.gate_floor + (1.0 - self.gate_floor) * torch.sigmoid(self.gate(up1))
        raw = self.out(up1) + gate * pattern
        return self.residual_scale * torch.tanh(raw)

    def encode(self, x: Tensor, bits: Tensor) -> Tensor:
        """The encoded images: ``clamp(x + residual, 0, 1)``."""
        return (x + self.residual(x, bits)).clamp(0.0, 1.0)

    forward = encode


class StegaDecoder(nn.Module):
    """Reads the bit logits back from an image: three 3x3 convolutions (two of stride 2), then two dense
    layers (StegaStamp's decoder without its spatial transformer, which undoes camera warps that
    digital poisoning never applies)."""

    def __init__(self, channels: int, size: tuple[int, int], bits: int, width: int = 16) -> None:
        super().__init__()
        reduced = math.ceil(math.ceil(size[0] / 2) / 2) * math.ceil(math.ceil(size[1] / 2) / 2)
        self.features = nn.Sequential(*_down(channels, 2 * width, 2), *_down(2 * width, 4 * width, 2),
                                      *_down(4 * width, 4 * width, 1))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * reduced, 256), nn.ReLU(inplace=True),
                                  nn.Linear(256, bits))
        # a linear read-out of the pixels beside the convolutions (the counterpart of the encoder's shortcut)
        self.linear = nn.Linear(channels * size[0] * size[1], bits)

    def forward(self, x: Tensor) -> Tensor:
        x = x - 0.5
        return self.head(self.features(x)) + self.linear(x.flatten(1))


class StegaCritic(nn.Module):
    """StegaStamp's WGAN critic: a few strided convolutions averaged to one score per image (higher for
    encoded images; the encoder lowers it)."""

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 1, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x - 0.5).mean((1, 2, 3))


def lpips_distance(weights: Path) -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS (Zhang et al. 2018, AlexNet) as a loss on ``[0, 1]`` images: torchmetrics' public
    :class:`~torchmetrics.image.LearnedPerceptualImagePatchSimilarity`, whose linear calibration layers
    ship with torchmetrics and whose backbone torchvision reads from its hub cache: ``weights``
    (torchvision's ImageNet ``alexnet`` state dict, ``alexnet-owt-7be5be79.pth``) is linked into a
    temporary cache under torchvision's file name, so nothing is downloaded. Grey images are repeated to
    three channels; images under 64 pixels are upsampled to 64 (AlexNet's smallest input)."""
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity
    from torchvision.models import AlexNet_Weights

    hub = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as folder:
        cached = Path(folder, "checkpoints", Path(AlexNet_Weights.IMAGENET1K_V1.url).name)
        cached.parent.mkdir()
        cached.symlink_to(weights.resolve())
        torch.hub.set_dir(folder)
        try:
            metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
        # a file that is not the state dict fails in torch.load (unpickling, I/O) or while matching keys and shapes
        except (OSError, RuntimeError, KeyError, ValueError, AttributeError, pickle.UnpicklingError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError("attack.lpips_weights", f"{weights} is not torchvision's AlexNet state dict "
                              f"({message})") from None
        finally:
            torch.hub.set_dir(hub)
    metric.requires_grad_(False)

    def distance(x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < 64:
            x, y = (F.interpolate(image, size=(64, 64), mode="bilinear") for image in (x, y))
        metric.to(x.device).reset()  # forward (differentiable) keeps one batch's scores, not every step's
        return metric(x, y)

    return distance


class StegaStampModule(BatchedModule):
    """Trains an encoder and a decoder together on clean images (ISSBA §4.2, Fig. 3; StegaStamp §3.2).

    Each step draws random bits per image, encodes, quantises to 8 bits (straight-through) and decodes:

    ``L = secret_weight * BCE(decoder(x_q), bits) + ramp * (l2_weight * mean((x_e - x)^2)
    + perceptual_weight * P(x_e, x) + critic_weight * critic(x_e))``

    with ISSBA's factors 2.0 (L2), 1.5 (perceptual), 0.5 (critic), 1.5 (bits). ``P`` is ``1 - SSIM`` or
    LPIPS. ``ramp`` is 0 for the first ``ramp_start`` share of the steps (the decoder learns to read
    first, StegaStamp's ``no_im_loss_steps``) and grows linearly to 1 at ``ramp_end`` (StegaStamp's
    loss ramps). The critic takes a WGAN step (RMSprop at ``lr / 10``, weights clipped to +-0.01) on each
    batch. Encoder and decoder use Adam, its learning rate ``lr`` decayed to 0 on a cosine over the steps
    (``cosine``; without it the bit accuracy of short runs varies more from seed to seed).
    """

    def __init__(self, encoder: StegaEncoder, decoder: StegaDecoder, critic: StegaCritic, batches: TensorBatches,
                 lr: float, weights: dict[str, float], perceptual: Callable[[Tensor, Tensor], Tensor],
                 ramp: tuple[float, float], cosine: bool = True) -> None:
        super().__init__(batches)
        self.encoder, self.decoder, self.critic = encoder, decoder, critic
        self.lr, self.weights, self.perceptual = lr, dict(weights), perceptual
        self.ramp_start, self.ramp_end = ramp
        self.cosine = cosine
        self.automatic_optimization = False
        self.steps_done = 0
        self.last: dict[str, float] = {}

    def progress(self) -> float:
        """The share of the training steps taken."""
        return self.steps_done / max(1, self.trainer.max_epochs * len(self.train_batches))

    def ramp(self) -> float:
        """The weight of the image losses at the current step (see the class docstring)."""
        progress = self.progress()
        if progress < self.ramp_start:
            return 0.0
        if self.ramp_end <= self.ramp_start:
            return 1.0
        return min(1.0, (progress - self.ramp_start) / (self.ramp_end - self.ramp_start))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        coder_optimizer, critic_optimizer = self.optimizers()
        x = to_float(batch[0])
        bits = torch.randint(0, 2, (len(x), self.encoder.bits), device=x.device).float()
        encoded = self.encoder.encode(x, bits)
        logits = self.decoder(quantise(encoded))
        secret = F.binary_cross_entropy_with_logits(logits, bits)
        l2 = (encoded - x).pow(2).mean()
        perceptual = self.perceptual(encoded, x)
        critic = self.critic(encoded).mean()
        ramp = self.ramp()
        w = self.weights
        loss = w["secret"] * secret + ramp * (w["l2"] * l2 + w["perceptual"] * perceptual + w["critic"] * critic)
        if self.cosine:
            for group in coder_optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * self.progress()))
        coder_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        coder_optimizer.step()
        self.steps_done += 1
        # the critic's WGAN step: low on clean images, high on encoded ones
        critic_loss = self.critic(x).mean() - self.critic(encoded.detach()).mean()
        critic_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(critic_loss)
        critic_optimizer.step()
        with torch.no_grad():
            for parameter in self.critic.parameters():
                parameter.clamp_(-CRITIC_CLIP, CRITIC_CLIP)
            accuracy = ((logits > 0).float() == bits).float().mean()
            psnr = peak_signal_noise_ratio(encoded, x, data_range=1.0)
        for name, value in (("bit_acc", accuracy), ("psnr", psnr), ("secret_loss", secret), ("ramp", ramp)):
            self.last[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)
        self.log_dict({f"issba/{k}": v for k, v in self.last.items()}, prog_bar=True, on_step=True,
                      on_epoch=False, logger=False)

    def configure_optimizers(self):
        coder = torch.optim.Adam([*self.encoder.parameters(), *self.decoder.parameters()], lr=self.lr)
        critic = torch.optim.RMSprop(self.critic.parameters(), lr=self.lr / 10)
        return [coder, critic]


def check_perceptual(perceptual: str, lpips_weights: str | None) -> None:
    """``attack.perceptual``: ``ssim``, or ``lpips`` with its backbone weights on disk (no download offline)."""
    if perceptual not in PERCEPTUAL:
        raise ConfigError("attack.perceptual", f"got {perceptual!r}, must be one of {', '.join(PERCEPTUAL)}")
    if perceptual == "lpips":
        path = Path(lpips_weights).expanduser() if lpips_weights else None
        if path is None or not path.is_file():
            raise ConfigError("attack.perceptual", f"lpips needs AlexNet's ImageNet weights, but the weights are not "
                              f"on disk at {str(path) if path else 'attack.lpips_weights (null)'}; set "
                              "attack.lpips_weights=<torchvision alexnet .pth> or use perceptual=ssim")


def perceptual_loss(perceptual: str, lpips_weights: str | None, size: tuple[int, int]) -> Callable[[Tensor, Tensor], Tensor]:
    """The perceptual term ``P(x_e, x)`` of :class:`StegaStampModule`: ``1 - SSIM`` or LPIPS."""
    if perceptual == "lpips":
        return lpips_distance(Path(lpips_weights).expanduser())  # type: ignore[arg-type]
    ssim = SSIM(size)

    def distance(x: Tensor, y: Tensor) -> Tensor:
        ssim.to(x.device)
        return 1.0 - ssim(x, y)

    return distance
