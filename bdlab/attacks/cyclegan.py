"""CycleGAN (Zhu, Park, Isola and Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017) sized for small images: the style generator of DFST (Cheng et al., AAAI 2021).

- :class:`StyleGenerator`: CycleGAN's ResNet generator (§4 and appendix 7.2: ``c7s1-w, d2w, R2w x blocks,
  u w, c7s1-C``) with one stride-2 level instead of two and ``width`` instead of 64 channels.
- :class:`PatchDiscriminator`: CycleGAN's PatchGAN (``C w - C 2w - C 4w``, then one score per patch).
- :class:`CycleGANModule`: the two generators and two discriminators trained together with the least-squares
  adversarial loss (§4, "Training details"), the cycle-consistency loss (Eq. 2) and the identity loss
  (§5.2), Lightning's manual optimisation with one Adam for the generators and one for the discriminators.

Images are float ``(N, C, H, W)`` in ``[0, 1]``; the networks see them in ``[-1, 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.datasets.base import to_float
from bdlab.training.loader import BatchedModule, TensorBatches

#: the smallest image side the networks take (one stride-2 level in the generator, two in the discriminator)
MIN_SIZE = 8
#: CycleGAN's Adam betas (§4, "Training details")
BETAS = (0.5, 0.999)


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True)


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with instance norm around a skip connection (CycleGAN's R block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels),
                                  nn.ReLU(inplace=True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), _norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class StyleGenerator(nn.Module):
    """CycleGAN's ResNet generator for small images: a 7x7 convolution to ``width`` channels, one stride-2
    convolution to ``2 * width``, ``blocks`` residual blocks, an upsampling back to the input's size (any
    size: nearest resize then a 3x3 convolution, not a transposed convolution, so odd sides work) and a 7x7
    convolution to the image's channels with ``tanh``.

    Args:
        channels: the images' channels.
        width: channels of the first level (CycleGAN: 64). Default 16.
        blocks: residual blocks at the bottleneck (CycleGAN: 6 at 128x128, 9 at 256x256). Default 3.
    """

    def __init__(self, channels: int, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(channels, width, 7), _norm(width),
                                  nn.ReLU(inplace=True),
                                  nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), _norm(2 * width),
                                  nn.ReLU(inplace=True),
                                  *(ResidualBlock(2 * width) for _ in range(blocks)))
        self.tail = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), _norm(width), nn.ReLU(inplace=True),
                                  nn.ReflectionPad2d(3), nn.Conv2d(width, channels, 7))

    def forward(self, x: Tensor) -> Tensor:
        """The translated images, float in ``[0, 1]``."""
        features = F.interpolate(self.head(x * 2 - 1), size=x.shape[-2:], mode="nearest")
        return (torch.tanh(self.tail(features)) + 1) / 2


class PatchDiscriminator(nn.Module):
    """CycleGAN's PatchGAN: two stride-2 4x4 convolutions (``width``, ``2 * width``), a 3x3 one (``4 * width``),
    LeakyReLU 0.2 and instance norm after the first, then one real/fake score per patch (the last two layers
    are 3x3 with stride 1 instead of 4x4, so 8x8 images keep a 2x2 map).

    Args:
        channels: the images' channels.
        width: channels of the first layer (CycleGAN: 64). Default 16.
    """

    def __init__(self, channels: int, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), _norm(2 * width), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), _norm(4 * width), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 1, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x * 2 - 1)


def _least_squares(scores: Tensor, real: bool) -> Tensor:
    """LSGAN's loss (Mao et al. 2017; CycleGAN §4): ``(D(x) - 1)^2`` for real, ``D(x)^2`` for fake."""
    return (scores - float(real)).pow(2).mean()


class CycleGANModule(BatchedModule):
    """Trains the generators ``G: A -> B`` (data to style) and ``F: B -> A`` and the discriminators ``D_B`` and
    ``D_A`` of CycleGAN (§3, Eq. 3) on unpaired batches.

    Each batch holds ``2C`` channels: an image of domain A and one of domain B, paired at random (the pairing
    carries no meaning; the losses never compare the two). One step:

    ``L_G = LS(D_B(G(a)), 1) + LS(D_A(F(b)), 1) + cycle_weight * (|F(G(a)) - a| + |G(F(b)) - b|)
    + identity_weight * cycle_weight * (|G(b) - b| + |F(a) - a|)``

    then ``L_D = (LS(D_B(b), 1) + LS(D_B(G(a)), 0)) / 2`` and the same for ``D_A`` (the discriminators learn at
    half the generators' rate, as CycleGAN's halved objective). CycleGAN's defaults: ``cycle_weight`` 10,
    ``identity_weight`` 0.5, Adam at ``lr`` 2e-4 with betas (0.5, 0.999), the learning rate constant for the
    first half of the steps and decayed linearly to 0 over the second. Not implemented: CycleGAN's history of
    50 generated images for the discriminator updates (each step uses the current batch's).
    """

    def __init__(self, generator: StyleGenerator, inverse: StyleGenerator, discriminator_b: PatchDiscriminator,
                 discriminator_a: PatchDiscriminator, batches: TensorBatches, channels: int, lr: float = 2e-4,
                 cycle_weight: float = 10.0, identity_weight: float = 0.5) -> None:
        super().__init__(batches)
        self.generator, self.inverse = generator, inverse
        self.discriminator_b, self.discriminator_a = discriminator_b, discriminator_a
        self.channels, self.lr = channels, lr
        self.cycle_weight, self.identity_weight = cycle_weight, identity_weight
        self.automatic_optimization = False
        self.steps_done = 0
        self.last: dict[str, float] = {}

    def progress(self) -> float:
        """The share of the training steps taken."""
        return self.steps_done / max(1, self.trainer.max_epochs * len(self.train_batches))

    def current_lr(self) -> float:
        """``lr`` for the first half of the steps, then linearly down to 0 (CycleGAN's schedule)."""
        return self.lr * min(1.0, 2.0 * (1.0 - self.progress()))

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        generators, discriminators = self.optimizers()
        for optimizer in (generators, discriminators):
            for group in optimizer.param_groups:
                group["lr"] = self.current_lr()
        pair = to_float(batch[0])
        a, b = pair[:, :self.channels], pair[:, self.channels:]
        fake_b, fake_a = self.generator(a), self.inverse(b)
        adversarial = _least_squares(self.discriminator_b(fake_b), True) + \
            _least_squares(self.discriminator_a(fake_a), True)
        cycle = (self.inverse(fake_b) - a).abs().mean() + (self.generator(fake_a) - b).abs().mean()
        identity = (self.generator(b) - b).abs().mean() + (self.inverse(a) - a).abs().mean()
        loss = adversarial + self.cycle_weight * (cycle + self.identity_weight * identity)
        generators.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        generators.step()
        critic = 0.5 * (_least_squares(self.discriminator_b(b), True) +
                        _least_squares(self.discriminator_b(fake_b.detach()), False) +
                        _least_squares(self.discriminator_a(a), True) +
                        _least_squares(self.discriminator_a(fake_a.detach()), False))
        discriminators.zero_grad(set_to_none=True)
        self.manual_backward(critic)
        discriminators.step()
        self.steps_done += 1
        for name, value in (("adversarial", adversarial), ("cycle", cycle), ("identity", identity),
                            ("discriminator", critic)):
            self.last[name] = float(value.detach())
        self.log_dict({f"dfst/{k}": v for k, v in self.last.items()}, prog_bar=True, on_step=True, on_epoch=False,
                      logger=False)

    def configure_optimizers(self):
        generators = torch.optim.Adam([*self.generator.parameters(), *self.inverse.parameters()], lr=self.lr,
                                      betas=BETAS)
        discriminators = torch.optim.Adam([*self.discriminator_b.parameters(), *self.discriminator_a.parameters()],
                                          lr=self.lr, betas=BETAS)
        return [generators, discriminators]

