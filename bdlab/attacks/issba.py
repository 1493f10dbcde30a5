"""ISSBA, the sample-specific invisible backdoor (Li, Li, Wu, Li, He and Lyu, "Invisible Backdoor Attack with
Sample-Specific Triggers", ICCV 2021): a StegaStamp encoder hides a secret string in each poisoned image."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from torch import Tensor

from bdlab.attacks.base import Attack, map_batches
from bdlab.attacks.stegastamp import (
    MIN_SIZE,
    StegaCritic,
    StegaDecoder,
    StegaEncoder,
    StegaStampModule,
    capacity,
    check_perceptual,
    perceptual_loss,
)
from bdlab.cache import content_digest, file_digest
from bdlab.compose import compose_config
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.errors import ConfigError, build, check_at_least, check_range
from bdlab.evaluate import predict
from bdlab.services import RunServices
from bdlab.training.loader import TensorBatches

log = logging.getLogger(__name__)

#: images encoded per forward pass when poisoning (bounds the U-Net's activation memory)
ENCODE_CHUNK = 512
#: part of the encoder's cache key: changing the networks or their training re-keys every encoder
ENCODER_VERSION = 2
ENCODER_KIND = "attacks/issba_encoder"


def secret_code(secret: str, bits: int | None = None) -> Tensor:
    """The bit string an encoder hides: the UTF-8 bytes of ``secret``, most significant bit first
    (StegaStamp's ``"Stega!!"`` is 56 bits), repeated cyclically to ``bits`` when that is longer
    (a repetition code). Float ``(bits,)`` in ``{0, 1}``."""
    data = secret.encode("utf-8")
    code = torch.tensor([(byte >> shift) & 1 for byte in data for shift in range(7, -1, -1)], dtype=torch.float32)
    if bits is None or bits == len(code):
        return code
    return code.repeat(-(-bits // len(code)))[:bits]


def load_dataset_option(name: str, root: str | Path, seed: int = 0) -> DatasetSplits:
    """The dataset of config option ``dataset=<name>`` with its defaults, read from ``root`` (the run's data
    directory): composed with Hydra (inside the run's own Hydra, or with :func:`bdlab.compose.compose_config`)
    and instantiated like the run's own dataset. Problems are one ConfigError line on ``attack.encoder_dataset``."""
    field = "attack.encoder_dataset"
    overrides = [f"dataset={name}", f"data_dir={root}", f"seed={seed}"]
    try:
        cfg = hydra.compose("config", overrides) if GlobalHydra.instance().is_initialized() else \
            compose_config(overrides)
    except MissingConfigException as error:
        raise ConfigError(field, f"no dataset option {name!r}; options: {', '.join(error.options or [])}") from None
    try:
        return build(cfg.dataset).load()
    except ConfigError as error:
        raise ConfigError(field, f"{name} cannot be loaded ({error})") from None


class ISSBA(Attack):
    """ISSBA, the sample-specific invisible backdoor attack (Li et al., ICCV 2021, §4.2 "How to Generate
    Sample-specific Triggers", Fig. 2-3; settings §5.1 "Attack Setup"; out-of-dataset encoders §5.3,
    Table 4).

    A StegaStamp encoder-decoder (Tancik et al., CVPR 2020; :mod:`bdlab.attacks.stegastamp`) is trained
    on the benign training set to hide bit strings in images; each poisoned image is the encoder's
    output for that image and the attacker's secret, so each image carries its own invisible additive
    trigger (ISSBA Definition 1: ``g(x_i) - x_i`` differs from image to image). Poisoning is the
    standard one of Eq. (1) with this generator ``g``, and the victim trains on it normally (Eq. (2)).

    Networks (small, for 28x28 to 64x64 images): the encoder is a two-level U-Net with batch norm whose
    residual, ``residual_scale * tanh(u + g * p)``, adds to the U-Net's output ``u`` a full-resolution
    pattern ``p`` made from the bits by a dense layer, through a per-pixel gate ``g`` in
    ``[gate_floor, 1]`` computed from the image (:class:`~bdlab.attacks.stegastamp.StegaEncoder`); the
    decoder is three convolutions, two dense layers and a linear read-out of the pixels. The shortcut
    makes the bits readable within a CPU budget; the gate decides how sample-specific the trigger is.
    On MNIST with LeNet, ``gate_floor`` 0 gives ISSBA's exclusive triggers (Table 3, ImageNet: the
    residual of another image, or the mean residual, reaches an ASR of 4-5% where the image's own
    reaches 88%) but the victim does not learn them reliably in 5 epochs (ASR 85% and 46% for seeds 0
    and 1); ``gate_floor`` 1 is close to one fixed pattern (75% of the residual's energy common to all
    images; every residual triggers, like ISSBA's MS-Celeb-1M case). StegaStamp's spatial transformer
    is left out: digital poisoning applies no camera warp to undo.

    Training (:class:`~bdlab.attacks.stegastamp.StegaStampModule`, a LightningModule fitted by the run's
    ``fit_helper`` with its trainer settings for ``encoder_epochs`` epochs): random bits per image (the secret
    itself never enters training), encoded images quantised to 8 bits before decoding
    (straight-through), StegaStamp's four losses with ISSBA §5.1's factors: residual L2 ``l2_weight``
    2.0, perceptual ``perceptual_weight`` 1.5, critic ``critic_weight`` 0.5 (a WGAN critic with its own
    RMSprop, manual optimisation), bit cross-entropy ``secret_weight`` 1.5. The image losses are off for
    the first ``ramp_start`` share of the steps and reach full weight at ``ramp_end`` (StegaStamp's
    ramps); Adam's learning rate decays to 0 on a cosine over the steps.

    The perceptual term is ``1 - SSIM`` by default (``perceptual: ssim``; torchmetrics' SSIM value,
    computed with a separable window, :class:`~bdlab.attacks.stegastamp.SSIM`): StegaStamp's LPIPS
    needs ImageNet-pretrained AlexNet weights that cannot be downloaded offline. ``perceptual: lpips``
    is accepted when ``lpips_weights`` names torchvision's AlexNet weights file on disk (torchmetrics'
    public LPIPS metric reads it, :func:`~bdlab.attacks.stegastamp.lpips_distance`); otherwise a ConfigError.

    Capacity: the code is ``secret_bits`` long (default: 8 bits per UTF-8 byte of ``secret``; a longer
    code repeats the secret); the encoder carries at most ``H * W // 8`` bits
    (:func:`~bdlab.attacks.stegastamp.capacity`: 98 at 28x28, 128 at 32x32, 512 at 64x64), and images
    must be at least 8x8. (StegaStamp hides 100 bits in 400x400 images.)

    The encoder is trained once per (encoder dataset and its sampled images, code length, image shape,
    encoder settings, seed) and kept in the artifact cache (``attacks/issba_encoder``): a second run, or
    another secret of the same length, reuses it. Its weights (with the decoder's) are also the attack's
    :meth:`state_dict`, stored with the trojaned model and restored bit-exactly on a cache hit. Poisoned
    images are encoded once per image set and kept as uint8 (``poisoned/issba``). :meth:`report` gives
    the decoder's bit accuracy (%) on the poisoned test images after their uint8 quantisation
    (``attack/bit_accuracy``) and on their clean sources (``attack/clean_bit_accuracy``, about 50: the
    decoder reads the trigger, not the image).

    Measured on MNIST with the defaults (seeds 0, 1, 2; 3000 poisoned test images): bit accuracy 99.6,
    99.4, 99.5%, PSNR 28.6, 29.6, 31.6 dB; 939 training steps, 130-190 s on one thread of a shared
    2-core CPU.

    Args:
        secret: the attacker's string (default ``"Stega!!"``, StegaStamp's example; 56 bits).
        secret_bits: length of the code (default null: ``8 * len(secret.encode())``).
        encoder_dataset: the dataset option the encoder trains on (default null: the run's dataset); it
            must have the run's image size and channels (ISSBA Table 4: an encoder trained on another
            dataset poisons as well). Read from ``root``.
        root: the data directory ``encoder_dataset`` is read from (the YAML passes the run's
            ``data_dir``; a location, not part of any cache key).
        encoder_images: training images the encoder sees, a seeded sample (default 10000; all when fewer).
        encoder_epochs: passes over them (default 3).
        encoder_batch_size: default 32 (ISSBA: 16 on 224x224 images).
        encoder_lr: Adam's initial learning rate for encoder and decoder (default 1e-3; the critic's
            RMSprop uses a tenth).
        encoder_width: channels of the encoder's first level; the decoder's first has twice (default 12).
        residual_scale: the largest change of a pixel (default 0.25, i.e. 64 grey levels; ISSBA Table 1
            reports an L-inf of 83 on ImageNet).
        gate_floor: the least share of the bits' pattern each pixel keeps (default 0.5, see above).
        ramp_start, ramp_end: shares of the training steps where the image losses start and reach full
            weight (defaults 0.2 and 0.6).
        l2_weight, perceptual_weight, critic_weight, secret_weight: the loss factors (2.0, 1.5, 0.5, 1.5).
        perceptual: ``ssim`` (default) or ``lpips``.
        lpips_weights: torchvision's AlexNet weights file for ``lpips`` (default null).
        poison_rate, target_class, seed, enhance, enhance_max_shrink: see
            :class:`~bdlab.attacks.base.Attack` (ISSBA: 10% poisoned).
    """

    name = "issba"
    headline_metrics = (*Attack.headline_metrics,
                        ("attack/bit_accuracy", "decoder bit accuracy on poisoned test images (%)"))

    def __init__(self, secret: str = "Stega!!", secret_bits: int | None = None, encoder_dataset: str | None = None,
                 root: str = "data", encoder_images: int = 10000, encoder_epochs: int = 3,
                 encoder_batch_size: int = 32, encoder_lr: float = 1e-3, encoder_width: int = 12,
                 residual_scale: float = 0.25, gate_floor: float = 0.5, ramp_start: float = 0.2, ramp_end: float = 0.6,
                 l2_weight: float = 2.0, perceptual_weight: float = 1.5, critic_weight: float = 0.5,
                 secret_weight: float = 1.5, perceptual: str = "ssim", lpips_weights: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(secret, str) or not secret:
            raise ConfigError("attack.secret", f"got {secret!r}, must be a non-empty string")
        natural = 8 * len(secret.encode("utf-8"))
        if secret_bits is not None:
            check_at_least("attack.secret_bits", secret_bits, natural)
        check_at_least("attack.encoder_images", encoder_images, 1)
        check_at_least("attack.encoder_epochs", encoder_epochs, 1)
        check_at_least("attack.encoder_batch_size", encoder_batch_size, 2)  # batch norm needs two images
        check_range("attack.encoder_lr", encoder_lr, 0.0, 1.0, low_open=True)
        check_at_least("attack.encoder_width", encoder_width, 1)
        check_range("attack.residual_scale", residual_scale, 0.0, 1.0, low_open=True)
        check_range("attack.gate_floor", gate_floor, 0.0, 1.0)
        check_range("attack.ramp_start", ramp_start, 0.0, 1.0)
        check_range("attack.ramp_end", ramp_end, ramp_start, 1.0)
        for field, value in (("l2_weight", l2_weight), ("perceptual_weight", perceptual_weight),
                             ("critic_weight", critic_weight), ("secret_weight", secret_weight)):
            check_at_least(f"attack.{field}", value, 0.0)
        if secret_weight <= 0:
            raise ConfigError("attack.secret_weight", f"got {secret_weight}, must be > 0 (the decoder learns nothing)")
        check_perceptual(perceptual, lpips_weights)
        if encoder_dataset is not None and not isinstance(encoder_dataset, str):
            raise ConfigError("attack.encoder_dataset", f"got {encoder_dataset!r}, must be a dataset option or null")
        self.secret, self.secret_bits = secret, None if secret_bits is None else int(secret_bits)
        self.encoder_dataset, self.root = encoder_dataset, root
        self.encoder_images, self.encoder_epochs = int(encoder_images), int(encoder_epochs)
        self.encoder_batch_size, self.encoder_lr = int(encoder_batch_size), float(encoder_lr)
        self.encoder_width, self.residual_scale = int(encoder_width), float(residual_scale)
        self.gate_floor = float(gate_floor)
        self.ramp_start, self.ramp_end = float(ramp_start), float(ramp_end)
        self.weights = {"l2": float(l2_weight), "perceptual": float(perceptual_weight),
                        "critic": float(critic_weight), "secret": float(secret_weight)}
        self.perceptual, self.lpips_weights = perceptual, lpips_weights
        self.code = secret_code(secret, self.secret_bits)
        self.encoder: StegaEncoder | None = None
        self.decoder: StegaDecoder | None = None
        self._trained = False
        self._source: ImageSet | None = None
        self._source_name = ""
        self.encoder_builds = 0  # encoders trained by this object (the cache makes it 0 on reuse)

    @property
    def bits(self) -> int:
        return len(self.code)

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        """Check the image size and the code's length against it, load ``encoder_dataset`` and check its
        shape, and build untrained networks; the encoder is trained (or read from the cache) on first use."""
        super().setup(data, resources)
        height, width = data.size
        if min(height, width) < MIN_SIZE:
            raise ConfigError("dataset", f"{data.name} images are {height}x{width}; issba's StegaStamp encoder needs "
                              f"at least {MIN_SIZE}x{MIN_SIZE}")
        limit = capacity(data.size)
        if self.bits > limit:
            field = "attack.secret" if self.secret_bits is None else "attack.secret_bits"
            raise ConfigError(field, f"the code is {self.bits} bits ({self.secret!r}: {len(self.secret.encode())} "
                              f"UTF-8 bytes x 8), but the encoder carries at most {limit} bits in {height}x{width} "
                              "images (one per 8 pixels); use a shorter secret")
        if self.encoder_dataset is None or self.encoder_dataset == data.name:
            self._source, self._source_name = data.train, data.name
        else:
            other = load_dataset_option(self.encoder_dataset, self.root, self.seed)
            if other.input_shape != data.input_shape:
                raise ConfigError("attack.encoder_dataset", f"{other.name} images are {_shape(other.input_shape)} but "
                                  f"{data.name} images are {_shape(data.input_shape)}; an encoder poisons only images "
                                  "of the size and channels it was trained on")
            self._source, self._source_name = other.train, other.name
        self._shape = data.input_shape
        # built now so that an unusable LPIPS weights file fails here, before anything is trained
        self._perceptual_loss = perceptual_loss(self.perceptual, self.lpips_weights, data.size)
        self._build_networks()

    def _build_networks(self) -> None:
        channels, height, width = self._shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.encoder = StegaEncoder(channels, (height, width), self.bits, self.encoder_width,
                                        self.residual_scale, self.gate_floor).eval()
            self.decoder = StegaDecoder(channels, (height, width), self.bits, self.encoder_width).eval()
        self._trained = False

    # ----------------------------------------------------------------------------- the encoder

    def encoder_training_images(self) -> Tensor:
        """The seeded sample of ``encoder_images`` training images (uint8) of the encoder's dataset."""
        if self._source is None:
            raise RuntimeError("ISSBA.setup(data) must run before the encoder is trained")
        count = min(self.encoder_images, len(self._source))
        generator = torch.Generator().manual_seed(self.seed + 3)
        chosen = torch.randperm(len(self._source), generator=generator)[:count]
        return self._source.images[chosen.sort().values]

    def encoder_spec(self, images: Tensor) -> dict[str, Any]:
        """Exactly what determines the trained encoder (its cache key)."""
        lpips = file_digest(Path(self.lpips_weights).expanduser()) if self.perceptual == "lpips" else None
        return {"attack": "issba", "version": ENCODER_VERSION, "dataset": self._source_name,
                "images": content_digest(images),
                "count": len(images), "shape": list(self._shape), "bits": self.bits, "epochs": self.encoder_epochs,
                "batch_size": self.encoder_batch_size, "lr": self.encoder_lr, "width": self.encoder_width,
                "residual_scale": self.residual_scale, "gate_floor": self.gate_floor,
                "ramp": [self.ramp_start, self.ramp_end],
                "weights": self.weights, "perceptual": self.perceptual, "lpips_weights": lpips, "seed": self.seed}

    def _networks(self) -> tuple[StegaEncoder, StegaDecoder]:
        """The trained encoder and decoder: restored from :meth:`load_state_dict`, read from the cache, or
        trained (and stored) now."""
        if self.encoder is None or self.decoder is None:
            raise RuntimeError("ISSBA.setup(data) must run before poisoning")
        if not self._trained:
            images = self.encoder_training_images()
            build_state = functools.partial(self._train_encoder, images)
            expected = set(self._network_state())
            state, reused = self.resources.cache.get_or_build(ENCODER_KIND, self.encoder_spec(images), build_state,
                                                              lambda found: set(found) == expected)
            if reused:
                log.info("issba: reusing the cached encoder (%d bits, %s)", self.bits, self._source_name)
            self._load_network_state(state)
        return self.encoder, self.decoder  # type: ignore[return-value]

    def _train_encoder(self, images: Tensor) -> dict[str, Tensor]:
        """Train fresh networks with :class:`StegaStampModule` through the run's ``fit_helper`` (its trainer
        settings, ``encoder_epochs`` epochs, a generator of its own: the run's random state is untouched,
        so a run behaves the same whether the encoder came from the cache or was trained); returns their state."""
        self._build_networks()
        batches = TensorBatches(images, torch.zeros(len(images), dtype=torch.long), self.encoder_batch_size,
                                shuffle=True, seed=self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            critic = StegaCritic(self._shape[0], self.encoder_width)
        module = StegaStampModule(self.encoder, self.decoder, critic, batches, self.encoder_lr, self.weights,
                                  self._perceptual_loss, (self.ramp_start, self.ramp_end))
        self.encoder.train()
        self.decoder.train()
        self.resources.fit_helper(module, self.seed, f"ISSBA encoder ({self.bits} bits) on {len(images)} "
                                  f"{self._source_name} images", max_epochs=self.encoder_epochs)
        self.encoder_builds += 1
        log.info("issba encoder: bit accuracy %.1f%%, PSNR %.1f dB on its last training batch",
                 100 * module.last.get("bit_acc", float("nan")), module.last.get("psnr", float("nan")))
        return {key: value.detach().cpu() for key, value in self._network_state().items()}

    def _network_state(self) -> dict[str, Tensor]:
        return {**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},  # type: ignore[union-attr]
                **{f"decoder.{k}": v for k, v in self.decoder.state_dict().items()}}  # type: ignore[union-attr]

    def _load_network_state(self, state: dict[str, Tensor]) -> None:
        expected = set(self._network_state())
        missing = expected - set(state)
        if missing:
            raise KeyError(f"issba state lacks {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
        for prefix, network in (("encoder.", self.encoder), ("decoder.", self.decoder)):
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            network.load_state_dict(part)  # type: ignore[union-attr]
            network.cpu().eval()  # type: ignore[union-attr]
        self._trained = True

    # ----------------------------------------------------------------------------- poisoning

    @torch.no_grad()
    def encode(self, x: Tensor, code: Tensor | None = None) -> Tensor:
        """``x`` (float ``(N, C, H, W)`` in ``[0, 1]``) with ``code`` hidden in each image: the secret's by
        default, one ``(bits,)`` code for all, or ``(N, bits)`` codes, one per image."""
        encoder, _ = self._networks()
        encoder.to(x.device)
        code = (self.code if code is None else code).to(x.device, x.dtype)
        codes = code.expand(len(x), -1) if code.dim() == 1 else code
        out = torch.empty_like(x)
        for start in range(0, len(x), ENCODE_CHUNK):  # not predict(): the encoder takes a code beside each image
            part = slice(start, start + ENCODE_CHUNK)
            out[part] = encoder.encode(x[part], codes[part])
        return out

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """The decoder's bits (float ``{0, 1}``, ``(N, bits)``) read from ``x`` in ``[0, 1]``."""
        _, decoder = self._networks()
        decoder.to(x.device)
        if len(x) == 0:
            return x.new_zeros(0, self.bits)
        return (predict(decoder, x, batch_size=ENCODE_CHUNK) > 0).to(x.device, x.dtype)

    def apply(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def stamp(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """Encoded uint8 copies of ``images``, computed once per (encoder, image set) and cached."""
        self._networks()

        def build_images() -> dict[str, Tensor]:
            return {"images": map_batches(lambda x, _: self.encode(x), images.cpu(), device)}

        if self._resources is None:
            return build_images()["images"].to(images.device)
        state = self._network_state()
        spec = {"attack": "issba", "encoder": content_digest(sorted(state), *(state[k] for k in sorted(state))),
                "code": self.code.tolist(), "images": content_digest(images)}
        tensors, _ = self.resources.cache.get_or_build("poisoned/issba", spec, build_images)
        return tensors["images"].to(images.device)

    def bit_accuracy(self, images: Tensor, device: torch.device | str = "cpu") -> float:
        """Share (%) of the secret's bits the decoder reads back from uint8 ``images``."""
        if len(images) == 0:
            return float("nan")
        _, decoder = self._networks()
        bits = predict(decoder.to(device), images, batch_size=ENCODE_CHUNK) > 0
        return 100.0 * float((bits == self.code.bool()).float().mean())

    def report(self, test: ImageSet, poisoned_test: ImageSet, device: torch.device | str = "cpu") -> dict[str, float]:
        return {"attack/bit_accuracy": self.bit_accuracy(poisoned_test.images, device),
                "attack/clean_bit_accuracy": self.bit_accuracy(test.images[self.test_sources(test)], device)}

    # ----------------------------------------------------------------------------- learned state

    def state_dict(self) -> dict[str, Tensor]:
        """The encoder's and decoder's weights (``encoder.*``, ``decoder.*``), as they are now: call it
        after poisoning, which trains or loads them (the pipeline does)."""
        if self.encoder is None:
            return {}
        return {key: value.detach().cpu().clone() for key, value in self._network_state().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.encoder is None:
            raise RuntimeError("ISSBA.setup(data) must run before its state is loaded")
        self._load_network_state(state)


def _shape(shape: tuple[int, ...]) -> str:
    channels, height, width = shape
    return f"{channels}x{height}x{width}"

