"""The Vision Transformer input: image patches -> tokens (``model.input: patches``).

Shape letters: B batch, C channels, H/W image height/width, P patch size, h/w the patch grid
(H/P, W/P), N = h * w patches, D model width.

    embed = PatchEmbedding(d_model=64, image_size=8, patch_size=2, channels=1, class_token=True)
    tokens = embed(images)          # images [B, 1, 8, 8] float -> tokens [B, 1 + 16, 64]

Dosovitskiy et al., ICLR 2021 (2010.11929), section 3.1: each P x P patch is flattened to
P^2 C values (channel-major, the order of a [D, C, P, P] conv weight) and projected to D,
which is a Conv2d with kernel = stride = P. A learned class token is prepended when the
model pools the CLS position (``model.pooling: cls``); otherwise the head mean-pools the
patches. Learned 1-D position embeddings are kept as a 2-D grid [h, w, D] so that an image of
another size (fine-tuning at a new resolution, section 3.2) resamples them bicubically over
(H/P, W/P); the class token's position row is kept aside and never interpolated.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from moe.blocks import register_input

Interpolation = Literal["bicubic", "bilinear"]


class ImageConfig(BaseModel):
    """Image geometry for ``model.input: patches`` (the ``model.image:`` section)."""

    model_config = ConfigDict(extra="forbid")

    image_size: int | tuple[int, int] = Field(description="H = W, or [H, W], in pixels")
    patch_size: int = Field(ge=1)
    channels: int = Field(default=3, ge=1)
    interpolation: Interpolation = "bicubic"

    @model_validator(mode="after")
    def _check_divisible(self) -> ImageConfig:
        height, width = self.size
        if height < 1 or width < 1:
            raise ValueError(f"model.image.image_size ({self.image_size}) must be positive")
        grid_shape((height, width), self.patch_size)
        return self

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        return tuple(self.image_size)

    def num_patches(self) -> int:
        """N = (H / P) * (W / P)."""
        height, width = grid_shape(self.size, self.patch_size)
        return height * width


def grid_shape(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """The patch grid (H / P, W / P); raises ValueError when P does not divide H or W."""
    height, width = image_size
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by model.image.patch_size "
            f"({patch_size}); resize the images or pick a patch size dividing both sides"
        )
    return height // patch_size, width // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images [B, C, H, W] -> flattened patches [B, N, C * P * P] (channel-major, row-major grid)."""
    grid_shape((images.shape[-2], images.shape[-1]), patch_size)
    columns = F.unfold(images, kernel_size=patch_size, stride=patch_size)  # [B, C*P*P, N]
    return columns.transpose(1, 2)


def interpolate_positions(
    positions: torch.Tensor,
    new_grid: tuple[int, int],
    mode: Interpolation = "bicubic",
) -> torch.Tensor:
    """Resample patch position embeddings [h, w, D] to [h', w', D] over the 2-D grid.

    align_corners=False keeps the pixel-centre convention, so the same grid maps each row
    onto itself exactly (the identity) and a doubled grid samples between the old centres.
    """
    if positions.dim() != 3:
        raise ValueError(f"positions must be [h, w, D], got shape {tuple(positions.shape)}")
    grid = positions.permute(2, 0, 1).unsqueeze(0)  # [1, D, h, w]
    # Bicubic weights are computed in the input dtype; fp32 at least keeps them accurate.
    work = grid if grid.dtype == torch.float64 else grid.float()
    resized = F.interpolate(work, size=new_grid, mode=mode, align_corners=False)
    return resized.to(positions.dtype).squeeze(0).permute(1, 2, 0)


class PatchEmbedding(nn.Module):
    """images [B, C, H, W] -> patch tokens + positions [B, N, D] (or [B, 1 + N, D] with CLS)."""

    def __init__(
        self,
        d_model: int,
        image_size: int | tuple[int, int],
        patch_size: int,
        channels: int = 3,
        *,
        class_token: bool = False,
        interpolation: Interpolation = "bicubic",
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.patch_size, self.channels, self.interpolation = patch_size, channels, interpolation
        self.image_size = size
        self.grid = grid_shape(size, patch_size)
        self.projection = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.empty(*self.grid, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.class_token: nn.Parameter | None = None
        self.class_position: nn.Parameter | None = None
        if class_token:
            # ViT: the class token starts at zero; its position row is learned like the others.
            self.class_token = nn.Parameter(torch.zeros(d_model))
            self.class_position = nn.Parameter(torch.empty(d_model))
            nn.init.normal_(self.class_position, std=0.02)

    @property
    def num_patches(self) -> int:
        """N at the configured image size."""
        return self.grid[0] * self.grid[1]

    def positions_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Patch position embeddings [h * w, D] for a patch grid (interpolated if it differs)."""
        positions = self.position
        if tuple(grid) != self.grid:
            positions = interpolate_positions(positions, grid, self.interpolation)
        return positions.reshape(grid[0] * grid[1], -1)

    @torch.no_grad()
    def resize(self, image_size: int | tuple[int, int]) -> None:
        """Resample the position grid in place for a new training resolution (fine-tuning)."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        grid = grid_shape(size, self.patch_size)
        resized = interpolate_positions(self.position.detach(), grid, self.interpolation)
        self.position = nn.Parameter(resized.contiguous())
        self.image_size, self.grid = size, grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"images must be [B, {self.channels}, H, W] (model.image.channels="
                f"{self.channels}), got shape {tuple(images.shape)}"
            )
        grid = grid_shape((images.shape[-2], images.shape[-1]), self.patch_size)
        weight = self.projection.weight
        tokens = self.projection(images.to(weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        tokens = tokens + self.positions_for(grid).to(tokens.dtype)
        if self.class_token is None:
            return tokens
        first = (self.class_token + self.class_position).to(tokens.dtype)
        return torch.cat([first.expand(tokens.shape[0], 1, -1), tokens], dim=1)


@register_input("patches")
def _patch_input(
    d_model: int,
    vocab_size: int | None,
    max_seq_len: int,
    image: ImageConfig | None = None,
    class_token: bool = False,
) -> nn.Module:
    if image is None:
        raise ValueError("model.input patches needs model.image (image_size, patch_size, channels)")
    return PatchEmbedding(
        d_model,
        image.size,
        image.patch_size,
        image.channels,
        class_token=class_token,
        interpolation=image.interpolation,
    )
