"""Training losses beyond pixel reconstruction: LPIPS, a patch discriminator and the VQGAN recipe.

- :class:`PerceptualLoss`: LPIPS (VGG16 trunk, Zhang et al. 2018), the same network eval reports.
  The trunk's ImageNet weights come from torch's hub cache or a configured file; nothing is
  downloaded. When they are absent the constructor raises a :class:`VistokError` naming the file,
  so a run asking for a perceptual loss stops at start-up instead of training against noise.
- :class:`PatchDiscriminator`: the NLayer (pix2pix / VQGAN) discriminator.
- :func:`hinge_d_loss`, :func:`hinge_g_loss`, :func:`adaptive_generator_weight` and
  :class:`LeCAM` (Tseng et al. 2021) complete the adversarial recipe of Esser et al. 2021.

Everything here is pure torch (plus ``lpips`` through :mod:`vistok.eval.pretrained`); the Lightning
module decides when to use what.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from vistok.eval.pretrained import VGG16_URL, load_lpips, vgg16_weights_path
from vistok.tokenizers.errors import VistokError


class PerceptualLoss(nn.Module):
    """LPIPS-VGG distance between images in [0, 1]; frozen, always in eval mode.

    The network is :func:`vistok.eval.pretrained.load_lpips` (the ``lpips`` package's v0.1 linear
    heads on torchvision's VGG16), the one eval reports LPIPS with, so the two are the same.

    Args:
        weights_path: torchvision's VGG16 state dict (``vgg16-397923af.pth``); None looks in the
            torch hub cache. Missing weights raise a VistokError: a run that asks for a
            perceptual loss must not silently train without one.

    forward(x (B, 3, H, W), y (B, 3, H, W)) in [0, 1], H, W >= 16 -> (B,) distances.
    """

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = vgg16_weights_path(weights_path or None)
        if not path.is_file():
            raise VistokError(
                f"the perceptual (LPIPS) loss needs torchvision's VGG16 weights at {path}, which is missing; "
                f"download {VGG16_URL} there (or set loss.perceptual.weights_path), or turn the loss off with loss.perceptual.weight=0."
            )
        self.net, _ = load_lpips(path)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        # the linear heads carry dropout layers: keep them off whatever the parent module does
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1, y * 2 - 1).flatten()


class PatchDiscriminator(nn.Module):
    """NLayer patch discriminator (pix2pix; as used by VQGAN).

    Args:
        channels: width of the first layer (doubles per layer, capped at 8x).
        num_layers: strided 4x4 convolutions; each halves the resolution.
        norm: ``"batch"`` (VQGAN), ``"group"`` (batch-size independent) or ``"none"``.
        image_size: checked against ``num_layers`` so the output map is not empty.

    forward(images (B, 3, H, W) in [0, 1]) -> logits (B, 1, h, w), one per overlapping patch.
    """

    NORMS = ("batch", "group", "none")

    def __init__(self, channels: int = 64, num_layers: int = 3, norm: str = "batch", image_size: int | None = None) -> None:
        super().__init__()
        if norm not in self.NORMS:
            raise VistokError(f"unknown discriminator norm {norm!r}; use one of {', '.join(self.NORMS)}.")
        if num_layers < 1:
            raise VistokError(f"the discriminator needs at least 1 layer, got num_layers={num_layers}.")
        if image_size is not None and image_size // 2**num_layers < 3:
            most = max(1, math.floor(math.log2(image_size / 3)))
            raise VistokError(f"a {num_layers}-layer patch discriminator needs images of at least {3 * 2**num_layers} px, got {image_size}; set loss.adversarial.num_layers to at most {most}.")

        def norm_layer(c: int) -> nn.Module:
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c), c)
            return nn.Identity()

        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=norm == "none"),
                       norm_layer(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for module in self.modules():  # VQGAN's init
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(x)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: -E[D(G(x))]."""
    return -logits_fake.mean()


def adaptive_generator_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ||dL_rec/dW|| / ||dL_gan/dW|| at the decoder's last weight W, detached.

    Both gradients are taken with ``retain_graph=True`` so the caller's backward still works.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def decoder_last_layer(decoder: nn.Module) -> nn.Parameter:
    """The weight of the decoder's output layer (the last registered matrix or kernel).

    Both of vistok's decoders register their pixel head last (TiTok ``head``, conv ``conv_out``);
    a decoder may name it explicitly with a ``last_layer`` attribute.
    """
    explicit = getattr(decoder, "last_layer", None)
    if isinstance(explicit, nn.Parameter):
        return explicit
    weights = [p for p in decoder.parameters() if p.ndim >= 2]
    if not weights:
        raise ValueError(f"{type(decoder).__name__} has no weight matrix to balance the adversarial loss against")
    return weights[-1]


class LeCAM(nn.Module):
    """LeCAM regulariser (Tseng et al., 2021) for the discriminator.

    Keeps exponential moving averages of the mean real and fake logits (buffers, so they are
    checkpointed) and penalises logits that drift past the other side's average:
    ``E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(G(x)))^2]``.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema_real.lerp_(logits_real.float().mean(), 1.0 - self.decay)
            self.ema_fake.lerp_(logits_fake.float().mean(), 1.0 - self.decay)
        return (F.relu(logits_real - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake).pow(2).mean())
