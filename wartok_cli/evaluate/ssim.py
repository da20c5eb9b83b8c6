"""SSIM (Wang, Bovik, Sheikh and Simoncelli, 2004) with a Gaussian window, in torch.

The constants are the paper's: an 11 x 11 Gaussian window with sigma 1.5, K1 = 0.01 and
K2 = 0.03 of the data range. Local statistics are population moments under the window,
computed per channel over the positions where the whole window fits (no padding). The
score of an image is the mean of the SSIM map over positions and channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW_SIZE = 11
SIGMA = 1.5
K1 = 0.01
K2 = 0.03


def window_size_for(height: int, width: int, size: int = WINDOW_SIZE) -> int:
    """Return the window side used for images of this size: ``size``, or the largest odd side that fits."""
    fitted = min(size, height, width)
    return fitted if fitted % 2 else fitted - 1


def gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Return a normalised 1-D Gaussian of ``size`` taps, centred on the middle tap."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Apply the separable Gaussian to every channel on its own; 'valid' positions only."""
    channels = images.shape[1]
    size = len(window)
    vertical = window.reshape(1, 1, size, 1).expand(channels, 1, size, 1)
    horizontal = window.reshape(1, 1, 1, size).expand(channels, 1, 1, size)
    return F.conv2d(F.conv2d(images, vertical, groups=channels), horizontal, groups=channels)


def ssim(
    images: torch.Tensor,
    references: torch.Tensor,
    data_range: float = 1.0,
    window_size: int = WINDOW_SIZE,
    sigma: float = SIGMA,
) -> torch.Tensor:
    """Return the SSIM of each image against its reference, shape (batch,).

    Both inputs are (batch, channels, height, width) on the same scale, [0, 1] for the
    default ``data_range``. Images smaller than the window use the largest odd window
    that fits (see ``window_size_for``), so an 8-pixel image gets a 7 x 7 window.
    """
    if images.shape != references.shape or images.dim() != 4:
        raise ValueError(
            f"ssim expects two (batch, channels, height, width) tensors of one shape, "
            f"got {tuple(images.shape)} and {tuple(references.shape)}"
        )
    # float32 at least, because E[x^2] - E[x]^2 in half precision cancels to noise.
    dtype = torch.promote_types(images.dtype, torch.float32)
    x = images.to(dtype)
    y = references.to(dtype)
    size = window_size_for(x.shape[-2], x.shape[-1], window_size)
    window = gaussian_window(size, sigma, dtype, x.device)

    mean_x = _filter(x, window)
    mean_y = _filter(y, window)
    variance_x = _filter(x * x, window) - mean_x**2
    variance_y = _filter(y * y, window) - mean_y**2
    covariance = _filter(x * y, window) - mean_x * mean_y

    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
    structure = (2 * covariance + c2) / (variance_x + variance_y + c2)
    return (luminance * structure).flatten(1).mean(1)
