"""Pretrained networks from local files: the FID Inception-v3 and LPIPS-VGG.

Evaluation reports rFID and LPIPS with them, and the training's perceptual loss reuses the same
LPIPS network, so both sides find, read and check the weights here.

Weights are never downloaded: they are read from the torch hub cache
(``torch.hub.get_dir()/checkpoints``, looked up at call time) or from a path given explicitly.
Without them :func:`load_inception` / :func:`load_lpips` return no network and one sentence
saying where they looked; a file given but unreadable or of another network is a VistokError.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from vistok.tokenizers.errors import VistokError

# torch-fidelity downloads to this name; pytorch-fid's copy of the same converted weights (the
# sha256 prefix in both names agrees) is accepted too.
INCEPTION_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_URL = URL_INCEPTION_V3
# torchvision's ImageNet VGG16 (VGG16_Weights.IMAGENET1K_V1), the backbone LPIPS was calibrated on.
VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def hub_checkpoint_dir() -> Path:
    """Where ``torch.hub`` keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _read_weights(path: Path, what: str, flag: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise VistokError(f"{what} weights {path} do not exist; pass the path of the downloaded file to {flag}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated download, HTML error page, another format...
        raise VistokError(f"{what} weights {path} cannot be read ({type(error).__name__}); download the file again.") from None
    if not isinstance(state, Mapping):
        raise VistokError(f"{what} weights {path} hold no state dict; download the file named in README again.")
    return dict(state)


# --------------------------------------------------------------------------------------------
# FID Inception-v3


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) float in [0, 1] -> uint8 in [0, 255] by round(x * 255) (not truncation): the FID Inception's input."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


class FIDInceptionV3(FeatureExtractorInceptionV3):
    """The FID Inception-v3 (torch-fidelity's port of the 2015-12-05 TF graph), 2048-d pool features.

    forward(images): (B, 3, H, W) uint8, or float in [0, 1] (rounded to 8 bits first) ->
    (B, features) float32. torch-fidelity's forward resizes to 299x299 the TF1 way (bilinear, no
    antialiasing) and scales by (x - 128) / 128, as the reference FID code does.

    ``features``: 2048 (the pool features rFID uses) or an earlier layer's 64/192/768 (cheap
    pipeline checks). ``state_dict=None`` builds the same architecture randomly initialised
    (He-normal convolutions so activations neither vanish nor explode): that checks the pipeline
    in tests without a download; its FID values mean nothing.
    """

    _building = True

    def __init__(self, state_dict: Mapping[str, Tensor] | None = None, features: int = 2048) -> None:
        if features not in (64, 192, 768, 2048):
            raise ValueError(f"features must be 64, 192, 768 or 2048, got {features}")
        # torch-fidelity's constructor downloads when it gets no weights path; an empty in-memory
        # placeholder keeps it offline, and the real weights are loaded below with weights_only.
        placeholder = io.BytesIO()
        torch.save({}, placeholder)
        placeholder.seek(0)
        super().__init__("inception-v3-compat", [str(features)], feature_extractor_weights_path=placeholder)
        self._building = False
        self.num_features = features  # read by torchmetrics and the evaluator
        if state_dict is None:
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        else:
            missing = [k for k in self.state_dict() if k not in state_dict]
            if missing:
                raise VistokError(
                    f"the Inception weights lack '{missing[0]}' and {len(missing) - 1} more tensors, so they are not the FID "
                    f"Inception-v3; use {INCEPTION_FILENAMES[0]} from {INCEPTION_URL}."
                )
            try:
                super().load_state_dict({k: v for k, v in state_dict.items() if k in self.state_dict()}, strict=True)
            except RuntimeError as error:  # same names, other shapes
                raise VistokError(f"the Inception weights do not fit the FID Inception-v3 ({str(error).splitlines()[-1].strip()[:200]}); "
                                  f"use {INCEPTION_FILENAMES[0]} from {INCEPTION_URL}.") from None
        self.requires_grad_(False)
        self.eval()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if self._building:  # the constructor's placeholder
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # batch norm must keep its running statistics

    def forward(self, images: Tensor) -> Tensor:  # type: ignore[override]
        if images.dtype != torch.uint8:
            images = to_uint8(images)
        return super().forward(images)[0]


def find_inception_weights() -> Path | None:
    """The FID Inception weights in the torch hub cache, or None."""
    for name in INCEPTION_FILENAMES:
        candidate = hub_checkpoint_dir() / name
        if candidate.is_file():
            return candidate
    return None


def load_inception(path: str | Path | None = None) -> tuple[FIDInceptionV3 | None, str | None]:
    """The FID Inception from ``path`` or the torch hub cache, and a note when it is absent.

    Returns (network, None), or (None, one sentence saying rFID is skipped, where the weights were
    looked for and how to provide them). A ``path`` given but unreadable raises VistokError.
    """
    found = Path(path).expanduser() if path is not None else find_inception_weights()
    if found is None:
        return None, (
            f"rFID skipped: no FID Inception weights at {hub_checkpoint_dir() / INCEPTION_FILENAMES[0]}; download "
            f"{INCEPTION_URL} into that folder once (or pass --inception-weights PATH / inception_weights=PATH)."
        )
    return FIDInceptionV3(_read_weights(found, "Inception", "--inception-weights")), None


# --------------------------------------------------------------------------------------------
# LPIPS-VGG


def vgg16_weights_path(path: str | Path | None = None) -> Path:
    """``path`` (user home expanded), or where the torch hub cache keeps torchvision's VGG16 weights."""
    return Path(path).expanduser() if path is not None else hub_checkpoint_dir() / VGG16_FILENAME


def build_lpips(backbone_state: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The ``lpips`` package's LPIPS-VGG network, with its v0.1 linear layers (shipped in the package).

    ``backbone_state``: torchvision's VGG16 state dict (``features.*`` keys, ``vgg16-397923af.pth``);
    None leaves the backbone randomly initialised (tests only: the numbers then mean nothing).
    Forward: two (B, 3, H, W) images in [-1, 1], H, W >= 16 -> (B, 1, 1, 1).
    """
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notes for lpips' `pretrained=` argument
        net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if backbone_state is not None:
        # lpips splits torchvision's vgg.features into slices but keeps each layer's index as its name.
        slice_of = {str(i): s for s, layers in enumerate((range(4), range(4, 9), range(9, 16), range(16, 23), range(23, 30)), 1) for i in layers}
        mapped: dict[str, Tensor] = {}
        for key, value in backbone_state.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "features" and parts[1] in slice_of:
                mapped[f"slice{slice_of[parts[1]]}.{parts[1]}.{parts[2]}"] = value
        missing = [k for k in net.net.state_dict() if k not in mapped]
        if missing:
            raise VistokError(f"the LPIPS backbone weights lack VGG16 tensor for '{missing[0]}'; use {VGG16_FILENAME} from {VGG16_URL}.")
        try:
            net.net.load_state_dict(mapped, strict=True)
        except RuntimeError as error:  # same names, other shapes
            raise VistokError(f"the LPIPS backbone weights do not fit VGG16 ({str(error).splitlines()[-1].strip()[:200]}); "
                              f"use {VGG16_FILENAME} from {VGG16_URL}.") from None
    net.requires_grad_(False)
    return net.eval()


def load_lpips(path: str | Path | None = None) -> tuple[nn.Module | None, str | None]:
    """LPIPS-VGG with the VGG16 backbone from ``path`` or the torch hub cache, and a note when absent."""
    found = vgg16_weights_path(path)
    if path is None and not found.is_file():
        return None, (
            f"LPIPS skipped: no VGG16 weights at {found}; download {VGG16_URL} into that folder once "
            "(or pass --lpips-weights PATH / lpips_weights=PATH)."
        )
    return build_lpips(_read_weights(found, "LPIPS VGG16", "--lpips-weights")), None


def load_networks(inception_weights: str | Path | bool | None,
                  lpips_weights: str | Path | bool | None) -> tuple[Any, Any, list[str]]:
    """The Inception (rFID) and LPIPS networks, each None with a note in ``notes`` when unavailable.

    A weights argument of None (or True) looks in the torch hub cache, a path loads that file,
    and False turns the metric off.
    """
    notes: list[str] = []
    inception = lpips = None
    if inception_weights is not False:
        inception, note = load_inception(None if inception_weights in (None, True) else inception_weights)
        notes += [note] if note else []
    if lpips_weights is not False:
        lpips, note = load_lpips(None if lpips_weights in (None, True) else lpips_weights)
        notes += [note] if note else []
    return inception, lpips, notes
