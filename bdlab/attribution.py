"""Attribution maps with captum (Saliency, SmoothGrad, Grad-CAM), batched, and the distances between them.

Every function takes a :class:`~bdlab.models.classifier.Classifier` and float images in ``[0, 1]``:
the classifier normalises inside its ``forward``, so gradients are taken with respect to the pixels
and flow through the normalisation (a map in pixel space, where triggers live).

- Saliency (Simonyan et al. 2014): ``|d y_c / d x|``.
- SmoothGrad (Smilkov et al. 2017, eq. 3): the gradient averaged over ``samples`` copies of the input
  with Gaussian noise of std ``noise_std`` (in ``[0, 1]`` pixel units, i.e. the noise level times the
  input range 1), then its magnitude.
- Grad-CAM (Selvaraju et al. ICCV 2017, eq. 1-2): ReLU of the channel-weighted activations of a
  convolutional layer (the last ``nn.Conv2d`` unless one is named), bilinearly upsampled to the input.

:func:`attribute` returns a map of the input's shape ``(N, C, H, W)``; :func:`heatmap` reduces it to one
non-negative ``(N, H, W)`` map per image (maximum magnitude over channels), :func:`normalise` scales each
map to a maximum of 1, and :func:`attribution_distance` is TrojanZoo's Table 19 distance between them.
"""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam, NoiseTunnel, Saliency
from torch import Tensor, nn

from bdlab.errors import ConfigError, check_at_least
from bdlab.models.classifier import Classifier

METHODS = ("saliency", "smoothgrad", "grad_cam")


def convolution_layers(model: Classifier) -> list[str]:
    """Names of the backbone's ``nn.Conv2d`` modules, in definition order."""
    return [name for name, module in model.net.named_modules() if isinstance(module, nn.Conv2d)]


def grad_cam_layer(model: Classifier, layer: str | None, field: str) -> str:
    """The Grad-CAM layer: ``layer`` if it names a convolution of ``model``, else the last convolution
    when ``layer`` is None; raises ConfigError (naming ``field`` and listing the layers) otherwise."""
    convolutions = convolution_layers(model)
    if layer is None:
        if not convolutions:
            raise ConfigError(field, "the model has no nn.Conv2d layer for Grad-CAM; use saliency or smoothgrad")
        return convolutions[-1]
    model.check_layer(field, layer)
    if layer not in convolutions:
        raise ConfigError(field, f"{layer!r} is not convolutional; Grad-CAM needs an nn.Conv2d layer: "
                          f"{', '.join(convolutions) or 'the model has none'}")
    return layer


def check_method(field: str, method: str) -> None:
    if method not in METHODS:
        raise ConfigError(field, f"got {method!r}, must be one of {', '.join(METHODS)}")


def check_smoothgrad(prefix: str, samples: int, noise_std: float) -> None:
    """SmoothGrad needs at least one noisy sample and a positive noise level."""
    check_at_least(f"{prefix}.samples", samples, 1)
    if not noise_std > 0:  # also refuses NaN
        raise ConfigError(f"{prefix}.noise_std", f"got {noise_std}, must be > 0 (in [0, 1] pixel units; "
                          "Smilkov et al. use 0.1-0.2)")


def attribute(model: Classifier, images: Tensor, targets: Tensor | int, method: str, *, layer: str | None = None,
              samples: int = 50, noise_std: float = 0.15, batch_size: int = 100) -> Tensor:
    """Attribution maps ``(N, C, H, W)`` (CPU, float32) of float ``images`` in ``[0, 1]`` for the classes
    ``targets`` (one int or ``(N,)``), computed ``batch_size`` images at a time on the model's device.

    ``method`` is ``saliency``, ``smoothgrad`` (``samples`` noisy copies of std ``noise_std``) or
    ``grad_cam`` (``layer``: a convolution's name, None = the last one; its one-channel map is repeated
    over the input's channels so every method has the input's shape).
    """
    check_method("method", method)
    if method == "smoothgrad":
        check_smoothgrad("smoothgrad", samples, noise_std)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.dim() == 0:
        targets = targets.expand(len(images))
    if method == "grad_cam":
        name = grad_cam_layer(model, layer, "layer")
        explainer = LayerGradCam(model, dict(model.net.named_modules())[name])
    else:
        # abs=False: SmoothGrad averages the signed gradients and takes the magnitude after (Smilkov eq. 3)
        explainer = Saliency(model)
    maps = []
    try:  # chunked here, not by predict(): captum needs gradients, which predict's inference mode does not keep
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device).float().requires_grad_(True)
            target = targets[start:start + batch_size].to(device)
            if method == "saliency":
                out = explainer.attribute(x, target=target, abs=True)
            elif method == "smoothgrad":
                out = NoiseTunnel(explainer).attribute(x, nt_type="smoothgrad", nt_samples=samples,
                                                       nt_samples_batch_size=min(samples, 10), stdevs=noise_std,
                                                       target=target, abs=False).abs()
            else:
                cam = explainer.attribute(x, target=target, relu_attributions=True)
                out = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
                out = out.expand(-1, x.shape[1], -1, -1)
            maps.append(out.detach().float().cpu())
    finally:
        model.train(was_training)
    if not maps:
        return torch.empty(0, *images.shape[1:])
    return torch.cat(maps)


def heatmap(maps: Tensor) -> Tensor:
    """One non-negative ``(N, H, W)`` map per image: the largest magnitude over channels (Simonyan et al.)."""
    return maps.abs().amax(1)


def normalise(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Each ``(H, W)`` map divided by its maximum (Grad-CAM's own visual normalisation); all-zero maps stay zero."""
    peak = maps.flatten(1).amax(1).clamp_min(eps)
    return maps / peak.view(-1, *([1] * (maps.dim() - 1)))


def attribution_distance(first: Tensor, second: Tensor) -> Tensor:
    """TrojanZoo §6.4, Table 19: the l1 distance between the normalised maps of a clean and a triggered
    input, divided by the image size (``H x W``), in %, per pair: ``(N,)`` for ``(N, H, W)`` maps.

    Maps are made non-negative and scaled to a maximum of 1 first (:func:`normalise`), so the distance
    lies in ``[0, 100]``: 0 for identical maps, 100 for a full-image map against an all-zero one.
    """
    if first.shape != second.shape:
        raise ValueError(f"maps differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    difference = normalise(first.abs()) - normalise(second.abs())
    return difference.abs().flatten(1).mean(1) * 100.0


def mass_inside(maps: Tensor, mask: Tensor, eps: float = 1e-12) -> Tensor:
    """Share (%) of each non-negative ``(N, H, W)`` map's total inside the bool mask ``(H, W)`` or ``(N, H, W)``:
    how much of the evidence sits on the trigger. NaN for an all-zero map."""
    inside = (maps * mask.to(maps.dtype)).flatten(1).sum(1)
    total = maps.flatten(1).sum(1)
    return torch.where(total > eps, 100.0 * inside / total.clamp_min(eps), torch.full_like(total, float("nan")))
