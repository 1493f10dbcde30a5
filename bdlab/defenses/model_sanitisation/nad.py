"""Neural Attention Distillation (Li et al., ICLR 2021): a teacher fine-tuned on a little clean data, then the
trojaned model distilled towards the teacher's attention maps of named layers."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.model_sanitisation.base import ModelSanitization, fine_tune
from bdlab.errors import ConfigError, check_at_least
from bdlab.evaluate import evaluate
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.augment import TrainAugment
from bdlab.training.fit import fit_classifier
from bdlab.training.hooks import Batch, TrainingHooks

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.ReLU6)


def attention_map(activation: Tensor, p: float = 2.0, eps: float = 1e-6) -> Tensor:
    """NAD's attention operator (Li et al. §3.2, "A^p_mean"; Zagoruyko & Komodakis 2017): the mean over
    channels of ``|activation|^p``, flattened per sample and divided by its L2 norm: ``(N, H*W)``."""
    flat = activation.abs().pow(p).mean(1).flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + eps)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """NAD's distillation loss between two activations of one layer (Li et al. Eq. 2): the distance of
    their normalised attention maps, measured as the authors' code does (``F.mse_loss``: the mean
    squared difference over samples and positions), which is what their beta = 5000 is calibrated for."""
    return F.mse_loss(attention_map(student, p), attention_map(teacher, p))


def default_attention_layer(model: Classifier) -> str:
    """The model's last convolutional block: the top-level module of the backbone holding its last
    ``nn.Conv2d`` (``layer4`` of a ResNet), or, where that is the convolution itself, the activation
    right after it (LeNet's ``relu2``), as NAD reads the residual groups' outputs."""
    children = list(model.net.named_children())
    holding = [index for index, (_, child) in enumerate(children)
               if isinstance(child, nn.Conv2d) or any(isinstance(m, nn.Conv2d) for m in child.modules())]
    if not holding:
        raise ConfigError("defense.layers", "the model has no convolution to read attention from; name its layers")
    index = holding[-1]
    name, child = children[index]
    if isinstance(child, nn.Conv2d) and index + 1 < len(children) and isinstance(children[index + 1][1], ACTIVATIONS):
        return children[index + 1][0]
    return name


class AttentionDistillation(TrainingHooks):
    """The student's hooks for the default victim module: besides the cross-entropy, ``beta`` times
    the attention loss to the (frozen, eval-mode) ``teacher`` summed over ``layers``, both models
    seeing the same augmented batch (Li et al. Eq. 3)."""

    def __init__(self, teacher: Classifier, layers: Sequence[str], beta: float, p: float) -> None:
        self.teacher, self.feature_layers, self.beta, self.p = teacher.eval(), tuple(layers), beta, p
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        self.teacher.to(batch.x.device)  # the teacher is not a submodule, so Lightning does not move it
        with torch.no_grad():
            targets = self.teacher.features(batch.x, list(self.feature_layers))
        loss = sum(attention_loss(batch.outputs[name], targets[name], self.p) for name in self.feature_layers)
        return {"at_loss": self.beta * loss}


class NAD(ModelSanitization):
    """Neural Attention Distillation (Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation:
    Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021, §3, Eqs. 1-3).

    1. Teacher: a copy of the trojaned model fine-tuned on the held-out clean split (the paper's 5% of
       the training data; bdlab's ``dataset.defense_fraction``) for ``teacher_epochs`` at ``teacher_lr``.
    2. Student: the trojaned model trained on the same split for ``epochs`` at ``lr`` with
       ``CE + beta * sum over layers of L_AT`` (:class:`AttentionDistillation` on the default victim
       module, through Lightning), ``L_AT`` the distance of the L2-normalised attention maps
       ``mean_c |a|^p`` of teacher and student (:func:`attention_loss`). The student is the sanitised model.

    Layers: ``layers`` names :meth:`Classifier.features` layers with convolutional ``(N, C, H, W)``
    output; null takes the model's last convolutional block (:func:`default_attention_layer`:
    ResNet ``layer4``, LeNet ``relu2``), as the authors' code weighs only the last residual group
    (beta3 = 5000, beta1 = beta2 = 0). The paper's schedule (SGD, lr 0.1 divided by 10 every 2 epochs,
    20 epochs, batch 64) is replaced by the run's recipe (SGD, momentum 0.9, cosine) at ``lr``, in
    batches of ``batch_size`` (the paper's 64) for both teacher and student.

    Defaults measured on MNIST / LeNet / BadNets (seed 0, 500 held-out images): a teacher fine-tuned at
    0.01 keeps the backdoor (ASR 99.8), so nothing is distilled away; at 0.1 for 20 epochs its ASR
    falls to 13%. The student at beta 5000 distils it at lr 0.02 (ASR 19%; at 0.01 it is still 81%);
    at lr 0.05, or beta 2e4 and more, LeNet collapses (ACC ~10%): the normalised attention map's
    gradient scales with 1 / ||A||, and LeNet has neither batch norm nor the residual groups the paper
    distils.

    TrojanZoo's paper does not evaluate NAD (Tables 8/9 have no NAD row). Reports ``defense/teacher_acc``
    and ``defense/teacher_asr`` (the fine-tuned teacher on the test sets: what fine-tuning alone does),
    besides the sanitisation protocol's ACC, ASR, ARD, CAD and ART.

    Args:
        layers: attention layers (null: the last convolutional block).
        beta: weight of the attention loss, >= 0 (default 5000, the paper's CIFAR-10 value).
        p: attention power, > 0 (default 2).
        teacher_epochs: teacher fine-tuning epochs, >= 1 (default 20).
        teacher_lr: teacher fine-tuning learning rate (default 0.1, the authors' initial rate).
        epochs: student distillation epochs, >= 1 (default 20, the paper's).
        lr: student learning rate (default 0.02).
        batch_size: batch size of teacher and student training (default 64, the paper's).
        seed: batch orders.
    """

    name = "nad"

    def __init__(self, layers: Sequence[str] | None = None, beta: float = 5000.0, p: float = 2.0,
                 teacher_epochs: int = 20, teacher_lr: float = 0.1, epochs: int = 20, lr: float = 0.02,
                 batch_size: int = 64, seed: int = 0) -> None:
        if layers is not None and (isinstance(layers, str) or len(layers) == 0):
            raise ConfigError("defense.layers", f"got {layers!r}, must be a non-empty list of layer names "
                              "(or null for the last convolutional block)")
        if not beta >= 0:
            raise ConfigError("defense.beta", f"got {beta}, must be >= 0")
        if not p > 0:
            raise ConfigError("defense.p", f"got {p}, must be > 0")
        check_at_least("defense.teacher_epochs", teacher_epochs, 1)
        check_at_least("defense.epochs", epochs, 1)
        check_at_least("defense.batch_size", batch_size, 1)
        for field, value in (("teacher_lr", teacher_lr), ("lr", lr)):
            if not value > 0:
                raise ConfigError(f"defense.{field}", f"got {value}, must be > 0")
        self.layers = None if layers is None else [str(name) for name in layers]
        self.beta, self.p = float(beta), float(p)
        self.teacher_epochs, self.teacher_lr, self.epochs, self.lr = int(teacher_epochs), float(teacher_lr), \
            int(epochs), float(lr)
        self.batch_size, self.seed = int(batch_size), seed
        self.input_shape: tuple[int, ...] | None = None

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if len(data.defense) == 0:
            raise ConfigError("dataset.defense_fraction", "NAD needs held-out clean images; raise it above 0")
        self.input_shape = data.input_shape

    def chosen_layers(self, model: Classifier) -> list[str]:
        return self.layers if self.layers is not None else [default_attention_layer(model)]

    def check_model(self, model: Classifier) -> None:
        layers = self.chosen_layers(model)
        for name in layers:
            model.check_layer("defense.layers", name)
        if self.input_shape is None:
            return
        model.eval()
        with torch.no_grad():
            outputs = model.features(torch.zeros(1, *self.input_shape), layers)
        for name in layers:
            if outputs[name].dim() != 4:
                raise ConfigError("defense.layers", f"{name!r} gives {tuple(outputs[name].shape[1:])} activations; "
                                  f"attention needs a convolutional (C, H, W) layer, e.g. "
                                  f"{default_attention_layer(model)!r}")

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers, "beta": self.beta, "p": self.p, "teacher_epochs": self.teacher_epochs,
                "teacher_lr": self.teacher_lr, "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "seed": self.seed}

    def sanitize(self, model: Classifier, context: RunServices) -> dict[str, Any]:
        data = context.data
        augment = TrainAugment(data.crop_padding, data.hflip)
        recipe = dataclasses.replace(context.recipe, batch_size=self.batch_size)  # few clean images: small batches
        model.to(context.device)
        teacher = copy.deepcopy(model)
        fine_tune(teacher, data.defense, recipe, self.teacher_epochs, self.teacher_lr, augment, self.seed,
                  "nad_teacher")
        teacher.to(context.device).eval()
        reports: dict[str, Any] = {}
        if getattr(context, "poisoned_test", None) is not None:
            graded = evaluate(teacher, data.test, context.poisoned_test, context.attack.target_class)
            reports = {"teacher_acc": graded.acc, "teacher_asr": graded.asr}
        hooks = AttentionDistillation(teacher, self.chosen_layers(model), self.beta, self.p)
        fit_classifier(model, data.defense, recipe.variant(self.epochs, self.lr), augment, hooks,
                       name="nad_student", seed=self.seed)
        model.to(context.device).eval()
        return reports
