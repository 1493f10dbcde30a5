"""DFST, the deep feature space trojan (Cheng, Liu, Ma and Zhang, "Deep Feature Space Trojan Attack of Neural
Networks by Controlled Detoxification", AAAI 2021): a CycleGAN-learnt style is the trigger."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from bdlab.attacks.base import Attack, map_batches
from bdlab.attacks.cyclegan import MIN_SIZE, CycleGANModule, PatchDiscriminator, StyleGenerator
from bdlab.attacks.detox import FeatureInjector, InjectorModule, compromised_neurons
from bdlab.attacks.style_domain import FIELD as STYLE_FIELD
from bdlab.attacks.style_domain import load_style_folder, style_folder_digest, sunrise
from bdlab.cache import Tensors, content_digest
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.nsr import default_k, layer_activations
from bdlab.services import RunServices
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform

log = logging.getLogger(__name__)

#: part of the generator's cache key: changing the networks or their training re-keys every generator
GENERATOR_VERSION = 1
GENERATOR_KIND = "attacks/dfst_generator"
#: images translated per forward pass when poisoning (bounds the generator's activation memory)
STYLE_CHUNK = 512
PROCEDURAL, FOLDER = "procedural", "folder"


class DFST(Attack):
    """DFST, the deep feature space trojan (Cheng et al., AAAI 2021; "Why is your Trojan NOT responding?"
    §4.1 item 3: "the attacker first trains a CycleGAN that incorporates styles (e.g., sunset). The CycleGAN
    can then generate a stylized image as poisonous samples").

    **Style generator.** A CycleGAN (Zhu et al., ICCV 2017; :mod:`bdlab.attacks.cyclegan`) learns to translate
    the dataset's images (domain A: a seeded sample of ``style_images`` training images) into the style domain
    (domain B): two generators, two PatchGAN discriminators, least-squares adversarial loss, cycle-consistency
    (``cycle_weight``, CycleGAN's 10) and identity (``identity_weight``, CycleGAN's 0.5) losses, trained through
    the run's ``fit_helper`` for ``generator_epochs`` epochs. The data-to-style generator is kept in the artifact
    cache (``attacks/dfst_generator``, keyed by both domains' content and every setting) and is the attack's
    :meth:`state_dict`, stored with the trojaned model and restored bit-exactly.

    **Style domain.** ``style_root``: a folder of style images (any depth, decoded as ``dataset=image_folder``
    decodes, resized to the dataset's size; DFST uses sunrise photos, "Why is your Trojan" Cezanne's paintings).
    With ``style_root`` null, an offline stand-in: a seeded sample of other training images through
    :func:`~bdlab.attacks.style_domain.sunrise` (warm tint, vignette, seeded grain); results then carry
    ``attack/procedural_style`` = 1 (0 with a folder) and the run logs it.

    **Poisoning.** The poisoned samples (``poison_rate`` of the training set, outside the target class) are
    replaced by their translation through the generator and relabelled to the target (dirty-label); test-time
    triggered inputs are the same translation of the test images. "Why is your Trojan" §5.1 poisons 20% of
    GTSRB for DFST.

    **Controlled detoxification** (``detox_rounds`` > 0; off by default). DFST retrains the trojaned model
    so that it cannot rely on the simple, pixel-level features of the style. Each round here: (1) train the
    model on the current training set with the run's recipe (``fit_helper``); (2) take ``detox_images`` clean,
    unpoisoned training images (seeded) and their stylised versions, and pick the ``detox_neurons`` neurons of
    ``detox_layer`` whose mean activation the style raises most (:func:`~bdlab.attacks.detox.compromised_neurons`;
    null: 10% of the layer); (3) train a feature injector (:class:`~bdlab.attacks.detox.FeatureInjector`, a
    three-layer convolutional network adding at most ``detox_bound`` per pixel) for ``detox_epochs`` epochs to
    raise those neurons alone on the clean images, close to them in SSIM; (4) add its outputs on those images,
    with their true labels, to the training set. After the last round the pipeline trains the model once more,
    as for any attack, on the poisoned set with every round's detoxicants. Simplified against the paper: one
    injector for all compromised neurons of one layer (DFST trains one per neuron, over several layers), a
    three-layer injector instead of DFST's autoencoder, and each round retrains with the full recipe rather
    than DFST's short fine-tuning.

    Args:
        style_root: folder of style images; null (default) for the procedural stand-in.
        style_images: images of each domain the CycleGAN trains on, a seeded sample (default 1000; all when fewer).
        generator_epochs: passes over them (default 4).
        generator_batch_size: default 16 (CycleGAN: 1).
        generator_lr: Adam's learning rate, constant for half the steps, then linearly to 0 (default 2e-4).
        generator_width: channels of the generators' first level and of the discriminators' first layer
            (default 8, for a CPU budget; CycleGAN: 64).
        generator_blocks: residual blocks of each generator (default 2; CycleGAN: 6 at 128x128).
        cycle_weight, identity_weight: CycleGAN's loss factors (10, 0.5).
        detox_rounds: rounds of controlled detoxification (default 0: off).
        detox_layer: the layer whose neurons are inspected (default ``penultimate``; any of the model's layers).
        detox_neurons: compromised neurons per round (default null: 10% of the layer's width).
        detox_images: clean training images that probe the neurons and become detoxicants (default 500).
        detox_epochs: the injector's epochs over them (default 5).
        detox_bound: the injector's largest pixel change (default 0.1, 25 grey levels).
        poison_rate, target_class, seed, enhance, enhance_max_shrink: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "dfst"

    def __init__(self, style_root: str | None = None, style_images: int = 1000, generator_epochs: int = 4,
                 generator_batch_size: int = 16, generator_lr: float = 2e-4, generator_width: int = 8,
                 generator_blocks: int = 2, cycle_weight: float = 10.0, identity_weight: float = 0.5,
                 detox_rounds: int = 0, detox_layer: str = "penultimate", detox_neurons: int | None = None,
                 detox_images: int = 500, detox_epochs: int = 5, detox_bound: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if style_root is not None and (not isinstance(style_root, str) or not style_root):
            raise ConfigError(STYLE_FIELD, f"got {style_root!r}, must be a folder of style images or null")
        check_at_least("attack.style_images", style_images, 1)
        check_at_least("attack.generator_epochs", generator_epochs, 1)
        check_at_least("attack.generator_batch_size", generator_batch_size, 1)
        check_range("attack.generator_lr", generator_lr, 0.0, 1.0, low_open=True)
        check_at_least("attack.generator_width", generator_width, 1)
        check_at_least("attack.generator_blocks", generator_blocks, 0)
        check_at_least("attack.cycle_weight", cycle_weight, 0.0)
        check_at_least("attack.identity_weight", identity_weight, 0.0)
        check_at_least("attack.detox_rounds", detox_rounds, 0)
        if detox_neurons is not None:
            check_at_least("attack.detox_neurons", detox_neurons, 1)
        check_at_least("attack.detox_images", detox_images, 1)
        check_at_least("attack.detox_epochs", detox_epochs, 1)
        check_range("attack.detox_bound", detox_bound, 0.0, 1.0, low_open=True)
        self.style_root, self.style_images = style_root, int(style_images)
        self.generator_epochs, self.generator_batch_size = int(generator_epochs), int(generator_batch_size)
        self.generator_lr, self.generator_width = float(generator_lr), int(generator_width)
        self.generator_blocks = int(generator_blocks)
        self.cycle_weight, self.identity_weight = float(cycle_weight), float(identity_weight)
        self.detox_rounds, self.detox_layer = int(detox_rounds), detox_layer
        self.detox_neurons = None if detox_neurons is None else int(detox_neurons)
        self.detox_images, self.detox_epochs = int(detox_images), int(detox_epochs)
        self.detox_bound = float(detox_bound)
        self.generator: StyleGenerator | None = None
        self.style_domain = FOLDER if style_root is not None else PROCEDURAL
        self.generator_builds = 0  # generators trained by this object (the cache makes it 0 on reuse)
        self._trained = False
        self._train: ImageSet | None = None
        self._style_folder: Tensor | None = None
        self._channels = 3

    @classmethod
    def cache_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """The base's, with ``style_root`` replaced by its images' digest: the trojaned model follows the style
        folder's content, so a moved folder is reused and an edited one retrains."""
        fields = super().cache_fields(fields)
        root = fields.get("style_root")
        digest = style_folder_digest(root) if root is not None else None
        return fields if digest is None else {**fields, "style_root": {"content": digest}}

    # ------------------------------------------------------------------------------------------ setup

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        """Check the image size, read the style folder (or say the procedural stand-in is used), check the
        detoxification layer, and build an untrained generator; it is trained (or read from the cache) on
        first use."""
        super().setup(data, resources)
        height, width = data.size
        if min(height, width) < MIN_SIZE:
            raise ConfigError("dataset", f"{data.name} images are {height}x{width}; dfst's CycleGAN needs at least "
                              f"{MIN_SIZE}x{MIN_SIZE}")
        if self.style_root is not None:
            self._style_folder = load_style_folder(self.style_root, data.channels, data.size)
            log.info("dfst: style domain: %d images of %s", len(self._style_folder), self.style_root)
        else:
            log.info("dfst: no attack.style_root given: the style domain is the procedural 'sunrise' stand-in "
                     "(training images with a warm tint, vignette and grain); results say attack/procedural_style=1")
        if self.detox_rounds and resources is not None:
            resources.fresh_model().check_layer("attack.detox_layer", self.detox_layer)
        self._train, self._channels = data.train, data.channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.generator = StyleGenerator(data.channels, self.generator_width, self.generator_blocks).eval()
        self._trained = False

    # ----------------------------------------------------------------------------- the style generator

    def _sample(self, count: int, offset: int) -> Tensor:
        """A seeded, sorted sample of ``count`` training-image indices (all when fewer)."""
        generator = torch.Generator().manual_seed(self.seed + offset)
        return torch.randperm(len(self._train), generator=generator)[:min(count, len(self._train))].sort().values

    def domains(self) -> tuple[Tensor, Tensor]:
        """The CycleGAN's unpaired training images, uint8: domain A (a seeded sample of training images) and
        domain B (as many style images: drawn from the folder, or other training images through the
        procedural style), one B image beside each A image."""
        if self._train is None:
            raise RuntimeError("DFST.setup(data) must run before the generator is trained")
        content = self._train.images[self._sample(self.style_images, 5)]
        draw = torch.Generator().manual_seed(self.seed + 6)
        if self._style_folder is not None:
            style = self._style_folder[torch.randint(0, len(self._style_folder), (len(content),), generator=draw)]
        else:
            other = torch.randperm(len(self._train), generator=draw)[:len(content)]
            style = sunrise(self._train.images[other], self.seed)
        return content, style

    def generator_spec(self, content: Tensor, style: Tensor) -> dict[str, Any]:
        """Exactly what determines the trained generator (its cache key)."""
        return {"attack": "dfst", "version": GENERATOR_VERSION, "content": content_digest(content),
                "style": content_digest(style), "domain": self.style_domain, "epochs": self.generator_epochs,
                "batch_size": self.generator_batch_size, "lr": self.generator_lr, "width": self.generator_width,
                "blocks": self.generator_blocks, "cycle_weight": self.cycle_weight,
                "identity_weight": self.identity_weight, "seed": self.seed}

    def _style_generator(self) -> StyleGenerator:
        """The trained data-to-style generator: restored from :meth:`load_state_dict`, read from the cache, or
        trained (and stored) now."""
        if self.generator is None:
            raise RuntimeError("DFST.setup(data) must run before poisoning")
        if not self._trained:
            content, style = self.domains()
            expected = set(self._generator_state())
            state, seconds = self.resources.cached(GENERATOR_KIND, self.generator_spec(content, style),
                                                   lambda: self._train_generator(content, style),
                                                   lambda found: set(found) == expected)
            log.info("dfst: style generator ready (%.0f s of training)", seconds)
            self.load_state_dict(state)
        return self.generator

    def _train_generator(self, content: Tensor, style: Tensor) -> Tensors:
        """Train fresh CycleGAN networks through the run's ``fit_helper`` (its trainer settings,
        ``generator_epochs`` epochs, a generator of its own: the run's random state is untouched)."""
        channels = self._channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            generator = StyleGenerator(channels, self.generator_width, self.generator_blocks)
            inverse = StyleGenerator(channels, self.generator_width, self.generator_blocks)
            critics = PatchDiscriminator(channels, self.generator_width), PatchDiscriminator(channels,
                                                                                            self.generator_width)
        batches = TensorBatches(torch.cat([content, style], 1), torch.zeros(len(content), dtype=torch.long),
                                self.generator_batch_size, shuffle=True, seed=self.seed)
        module = CycleGANModule(generator, inverse, *critics, batches, channels, self.generator_lr,
                                self.cycle_weight, self.identity_weight)
        self.resources.fit_helper(module, self.seed, f"DFST CycleGAN ({self.style_domain} style) on {len(content)} "
                                  "image pairs", max_epochs=self.generator_epochs)
        self.generator_builds += 1
        log.info("dfst CycleGAN, last step: %s", ", ".join(f"{k} {v:.3f}" for k, v in module.last.items()))
        return {f"generator.{k}": v.detach().cpu().clone() for k, v in generator.state_dict().items()}

    def _generator_state(self) -> dict[str, Tensor]:
        return {f"generator.{k}": v for k, v in self.generator.state_dict().items()}  # type: ignore[union-attr]

    # ----------------------------------------------------------------------------- poisoning

    @torch.no_grad()
    def apply(self, x: Tensor) -> Tensor:
        """The stylised images: the data-to-style generator on a float batch in ``[0, 1]``."""
        generator = self._style_generator().to(x.device)
        return torch.cat([generator(x[start:start + STYLE_CHUNK]) for start in range(0, len(x), STYLE_CHUNK)]) \
            if len(x) else x.clone()

    def report(self, test: ImageSet, poisoned_test: ImageSet, device: torch.device | str = "cpu") -> dict[str, float]:
        """``attack/procedural_style``: 1 when the generator learnt the procedural stand-in style, 0 for a
        folder of style images (results hold numbers only)."""
        return {"attack/procedural_style": float(self.style_domain == PROCEDURAL)}

    # ----------------------------------------------------------------------------- detoxification

    def training_module(self, model, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: BatchTransform | None, name: str) -> pl.LightningModule:
        """The victim module, on the poisoned set plus each detoxification round's detoxicants (class
        docstring); the plain victim module without detoxification."""
        if not self.detox_rounds:
            return super().training_module(model, batches, recipe, augment, name)
        from bdlab.training.victim import VictimModule

        images, labels, flags = batches.images, batches.labels, batches.is_poison
        probe = self._train_index_unpoisoned()
        clean, clean_labels = self._train.images[probe], self._train.labels[probe]  # type: ignore[union-attr]
        stylised = self.stamp(clean, self.resources.device)
        for round_ in range(self.detox_rounds):
            current = TensorBatches(images, labels, batches.batch_size, shuffle=True, seed=batches.seed + round_,
                                    is_poison=flags)
            self.resources.fit_helper(VictimModule(model, current, recipe, augment, hooks=self, name=name),
                                      recipe.seed + round_, f"trojan model before detoxification round {round_ + 1}")
            detoxicants = self.detoxicants(model.to(self.resources.device), clean, stylised, round_)
            images = torch.cat([images, detoxicants])
            labels = torch.cat([labels, clean_labels])
            flags = torch.cat([flags, torch.zeros(len(clean), dtype=torch.bool)])
            model.train()
        final = TensorBatches(images, labels, batches.batch_size, shuffle=True, seed=batches.seed, is_poison=flags)
        return super().training_module(model, final, recipe, augment, name)

    def _train_index_unpoisoned(self) -> Tensor:
        """Seeded indices of ``detox_images`` training images that are not poisoned."""
        labels = self._train.labels  # type: ignore[union-attr]
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[self.poison_indices(labels)] = False
        candidates = keep.nonzero().flatten()
        generator = torch.Generator().manual_seed(self.seed + 7)
        return candidates[torch.randperm(len(candidates), generator=generator)[:self.detox_images]].sort().values

    def detoxicants(self, model, clean: Tensor, stylised: Tensor, round_: int = 0) -> Tensor:
        """One round's detoxicants (uint8, one per ``clean`` image): find the compromised neurons of ``model``,
        train a feature injector on them, and inject the feature into ``clean``."""
        width = layer_activations(model, clean[:1], self.detox_layer).shape[1]
        count = default_k(width) if self.detox_neurons is None else self.detox_neurons
        if count > width:
            raise ConfigError("attack.detox_neurons", f"got {count}, but layer {self.detox_layer!r} has {width} "
                              "neurons")
        neurons = compromised_neurons(model, clean, stylised, self.detox_layer, count)
        seed = self.seed + 100 + round_
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            injector = FeatureInjector(self._channels, bound=self.detox_bound)
        batches = TensorBatches(clean, torch.zeros(len(clean), dtype=torch.long), self.generator_batch_size,
                                shuffle=True, seed=seed)
        module = InjectorModule(injector, model, self.detox_layer, neurons, batches, tuple(clean.shape[-2:]))
        self.resources.fit_helper(module, seed, f"DFST feature injector, round {round_ + 1} ({count} neurons of "
                                  f"{self.detox_layer})", max_epochs=self.detox_epochs)
        log.info("dfst detoxification round %d: %s", round_ + 1,
                 ", ".join(f"{k} {v:.3f}" for k, v in module.last.items()))
        injector.eval()
        with torch.no_grad():
            return map_batches(lambda x, _: injector.to(x.device)(x), clean, self.resources.device)

    # ----------------------------------------------------------------------------- learned state

    def state_dict(self) -> dict[str, Tensor]:
        """The data-to-style generator's weights (``generator.*``), as they are now: call it after poisoning,
        which trains or loads them (the pipeline does)."""
        if self.generator is None:
            return {}
        return {key: value.detach().cpu().clone() for key, value in self._generator_state().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.generator is None:
            raise RuntimeError("DFST.setup(data) must run before its state is loaded")
        missing = set(self._generator_state()) - set(state)
        if missing:
            raise KeyError(f"dfst state lacks {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
        self.generator.load_state_dict({k.removeprefix("generator."): v for k, v in state.items()
                                        if k.startswith("generator.")})
        self.generator.cpu().eval()
        self._trained = True
