"""LPIPS perceptual distance on VGG16 features (Zhang et al., CVPR 2018), as a frozen loss network.

The distance compares the activations of five VGG16 layers (relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3). Each activation is normalised to unit length along
channels, the squared difference is weighted per channel by a learned 1x1
convolution, averaged over positions, and the five layers are summed.

Module and parameter names copy the ``lpips`` package's ``LPIPS(net="vgg")``,
so its state dict loads directly. Weights come from the caller as a state dict:
this module reads no files and downloads nothing.
"""

from __future__ import annotations

import torch
from torch import nn

# The VGG16 ``features`` layers (torchvision numbering) that end each of the five slices.
SLICE_ENDS = (4, 9, 16, 23, 30)
LAYER_CHANNELS = (64, 128, 256, 512, 512)
# The convolutions of torchvision's VGG16 ``features``: (index, input channels, output channels).
VGG16_CONVOLUTIONS = (
    (0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
    (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512),
)  # fmt: skip
MAX_POOLS = (4, 9, 16, 23)
# Input shift and scale of LPIPS v0.1, which map [-1, 1] images to the ImageNet statistics VGG16 expects.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_RESOLUTION = 16  # relu5_3 follows four 2x2 max-pools


class ScalingLayer(nn.Module):
    """Shift and scale of LPIPS v0.1 applied to [-1, 1] RGB images."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.shift) / self.scale


class VGG16Features(nn.Module):
    """VGG16 ``features`` up to relu5_3, in five slices that keep torchvision's layer numbers."""

    def __init__(self) -> None:
        super().__init__()
        convolutions = {index: (inputs, outputs) for index, inputs, outputs in VGG16_CONVOLUTIONS}
        start = 0
        for number, end in enumerate(SLICE_ENDS, start=1):
            layers = nn.Sequential()
            for index in range(start, end):
                if index in convolutions:
                    layers.add_module(str(index), nn.Conv2d(*convolutions[index], kernel_size=3, padding=1))
                elif index in MAX_POOLS:
                    layers.add_module(str(index), nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers.add_module(str(index), nn.ReLU(inplace=False))
            setattr(self, f"slice{number}", layers)
            start = end

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        activations = []
        hidden = images
        for number in range(1, len(SLICE_ENDS) + 1):
            hidden = getattr(self, f"slice{number}")(hidden)
            activations.append(hidden)
        return activations


class LinearLayer(nn.Module):
    """The learned per-channel weights of one VGG layer: a 1x1 convolution to one channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Index 0 is an identity in place of the dropout that LPIPS applied while fitting these weights,
        # so the parameter is named ``model.1.weight`` as in the checkpoint.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """LPIPS distance with the VGG16 backbone; images (batch, 1 or 3, H, W) in [-1, 1], H and W >= 16.

    Grayscale images are repeated to three channels. The network is frozen and in
    eval mode. Gradients flow to the images, which is what a training loss needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for index, channels in enumerate(LAYER_CHANNELS):
            setattr(self, f"lin{index}", LinearLayer(channels))
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen loss network: a parent module's .train() must not switch it out of eval mode.
        return super().train(False)

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Return the distance of each image to its reference, (batch,), in fp32."""
        if images.shape != references.shape:
            raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} differ in shape")
        if images.shape[1] == 1:
            images, references = images.expand(-1, 3, -1, -1), references.expand(-1, 3, -1, -1)
        if min(images.shape[-2:]) < MIN_RESOLUTION:
            raise ValueError(
                f"LPIPS needs images of at least {MIN_RESOLUTION} pixels a side, got {tuple(images.shape)}"
            )
        batch = images.shape[0]
        # One pass over both sets halves the number of calls into the backbone.
        activations = self.net(self.scaling_layer(torch.cat([images, references])))
        distance = torch.zeros(batch, device=images.device, dtype=torch.float32)
        for index, features in enumerate(activations):
            features = _unit_channels(features.float())
            difference = (features[:batch] - features[batch:]).pow(2)
            weighted = getattr(self, f"lin{index}")(difference)
            distance = distance + weighted.float().mean(dim=(1, 2, 3))
        return distance


def lpips_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the weights of ``LPIPS`` from a state dict in one of the accepted layouts.

    Accepted layouts: the ``lpips`` package's ``LPIPS(net="vgg").state_dict()``
    (``net.slice1.0.weight`` ... and ``lin0.model.1.weight`` ...), or torchvision's
    ``vgg16`` state dict (``features.0.weight`` ...) merged with the five linear
    layers of LPIPS v0.1 (``lin0.model.1.weight`` ..., the content of the lpips
    package's ``weights/v0.1/vgg.pth``). Other keys, such as the classifier of
    torchvision's VGG16, are ignored. Raise ValueError naming the missing or
    misshapen keys.
    """
    slice_of = {}
    start = 0
    for number, end in enumerate(SLICE_ENDS, start=1):
        for index in range(start, end):
            slice_of[index] = number
        start = end

    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("features."):
            index, _, name = key.removeprefix("features.").partition(".")
            if index.isdigit() and int(index) in slice_of:
                converted[f"net.slice{slice_of[int(index)]}.{index}.{name}"] = value
        elif key.startswith(("net.slice", "lin")) and not key.startswith("lins."):
            converted[key] = value

    with torch.device("meta"):  # shapes only: no memory for 14.7M parameters
        reference = LPIPS()
    expected = {
        key: value.shape for key, value in reference.state_dict().items() if not key.startswith("scaling_layer.")
    }
    missing = sorted(key for key in expected if key not in converted)
    misshapen = sorted(
        f"{key} {tuple(converted[key].shape)} (expected {tuple(shape)})"
        for key, shape in expected.items()
        if key in converted and converted[key].shape != shape
    )
    problems = []
    if missing:
        backbone = [key for key in missing if key.startswith("net.")]
        linear = [key for key in missing if key.startswith("lin")]
        if backbone:
            problems.append(f"{len(backbone)} VGG16 backbone tensors are missing (first: {backbone[0]})")
        if linear:
            problems.append(f"{len(linear)} LPIPS linear-layer tensors are missing (first: {linear[0]})")
    if misshapen:
        problems.append(f"tensors of the wrong shape: {', '.join(misshapen[:3])}")
    if problems:
        raise ValueError("; ".join(problems))
    return {key: converted[key].float() for key in expected}
