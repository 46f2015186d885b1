"""ViT patch embedding (attention_spec.md section 12): conv = unfold + linear, shapes, errors,
position-embedding interpolation (identity on the same grid, exact on linear ramps, CLS row
kept aside), and the model's ``model.input: patches`` hook. Oracles are float64."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moe.config import MoEConfig
from moe.transformer import ModelConfig, Transformer
from moe.vision import ImageConfig, PatchEmbedding, interpolate_positions, patchify


def reference_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C*P*P] by explicit reshapes: channel-major within a patch,
    patches in row-major grid order (independent of F.unfold)."""
    batch, channels, height, width = images.shape
    grid = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    grid = grid.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, P, P]
    return grid.reshape(batch, (height // patch) * (width // patch), channels * patch * patch)


def make_embedding(**kwargs) -> PatchEmbedding:
    torch.manual_seed(0)
    return PatchEmbedding(**kwargs).double()


@pytest.mark.parametrize("size,patch,channels", [((8, 8), 2, 1), ((6, 10), 2, 3), ((12, 8), 4, 2)])
def test_conv_equals_unfold_plus_linear(size, patch, channels):
    embed = make_embedding(d_model=5, image_size=size, patch_size=patch, channels=channels)
    with torch.no_grad():
        embed.position.zero_()
    images = torch.randn(3, channels, *size, dtype=torch.float64)
    flat = reference_patches(images, patch)
    weight = embed.projection.weight.reshape(
        5, channels * patch * patch
    )  # [D, C, P, P] -> [D, CPP]
    expected = flat @ weight.T + embed.projection.bias
    torch.testing.assert_close(embed(images), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(patchify(images, patch), flat, rtol=0, atol=0)


def test_output_shape_and_class_token_row():
    embed = make_embedding(
        d_model=6, image_size=(8, 12), patch_size=4, channels=3, class_token=True
    )
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    out = embed(images)
    assert embed.num_patches == 2 * 3
    assert out.shape == (2, 1 + 6, 6)
    first = embed.class_token + embed.class_position
    torch.testing.assert_close(out[:, 0], first.expand(2, -1))
    plain = make_embedding(d_model=6, image_size=(8, 12), patch_size=4, channels=3)
    assert plain(images).shape == (2, 6, 6)
    torch.testing.assert_close(out[:, 1:], plain(images))  # same seed, same weights


def test_non_divisible_image_size_raises():
    with pytest.raises(ValueError, match="not divisible by model.image.patch_size"):
        PatchEmbedding(d_model=4, image_size=9, patch_size=2, channels=1)
    embed = PatchEmbedding(d_model=4, image_size=8, patch_size=2, channels=1)
    with pytest.raises(ValueError, match="8x9 is not divisible"):
        embed(torch.randn(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"images must be \[B, 1, H, W\]"):
        embed(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValidationError, match="not divisible"):
        ImageConfig(image_size=(8, 10), patch_size=4)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_interpolation_to_same_grid_is_identity(mode, grid):
    positions = torch.randn(*grid, 7, dtype=torch.float64)
    torch.testing.assert_close(
        interpolate_positions(positions, grid, mode), positions, rtol=1e-12, atol=1e-12
    )


def test_bilinear_interpolation_is_exact_on_a_ramp_along_the_width():
    # Value = 3 * x + 1 at the grid-cell centre x in [0, 1] along w; constant along h. Bilinear
    # resampling reproduces it at every new centre whose source lies inside the old centres.
    old, new = (2, 4), (5, 8)
    centres = (torch.arange(old[1], dtype=torch.float64) + 0.5) / old[1]
    positions = (3 * centres + 1).expand(old[0], old[1]).unsqueeze(-1).repeat(1, 1, 2)
    out = interpolate_positions(positions, new, "bilinear")
    assert out.shape == (5, 8, 2)
    new_centres = (torch.arange(new[1], dtype=torch.float64) + 0.5) / new[1]
    inside = (new_centres >= centres[0]) & (new_centres <= centres[-1])
    expected = (3 * new_centres + 1).expand(new[0], new[1])
    torch.testing.assert_close(out[..., 0][:, inside], expected[:, inside], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., 0], out[..., 1])
    for mode in ("bilinear", "bicubic"):  # interpolation weights sum to one
        constant = torch.full((3, 4, 2), 0.25, dtype=torch.float64)
        torch.testing.assert_close(
            interpolate_positions(constant, (6, 7), mode), torch.full((6, 7, 2), 0.25).double()
        )


def test_new_image_size_interpolates_patch_rows_and_keeps_class_row():
    embed = make_embedding(d_model=4, image_size=8, patch_size=2, channels=1, class_token=True)
    big = torch.randn(2, 1, 12, 16, dtype=torch.float64)
    out = embed(big)
    assert out.shape == (2, 1 + 6 * 8, 4)
    torch.testing.assert_close(out[:, 0], (embed.class_token + embed.class_position).expand(2, -1))
    with torch.no_grad():
        embed.position.zero_()
        embed.class_position.zero_()
    base = embed(big)
    torch.manual_seed(0)
    fresh = make_embedding(d_model=4, image_size=8, patch_size=2, channels=1, class_token=True)
    positions = interpolate_positions(fresh.position.detach(), (6, 8), "bicubic").reshape(48, 4)
    torch.testing.assert_close(fresh(big)[:, 1:] - base[:, 1:], positions.expand(2, -1, -1))
    # resize() stores the same resampled grid; the class position stays as it was.
    class_before = fresh.class_position.detach().clone()
    fresh.resize((12, 16))
    assert fresh.grid == (6, 8) and fresh.position.shape == (6, 8, 4)
    torch.testing.assert_close(fresh.position.detach().reshape(48, 4), positions)
    torch.testing.assert_close(fresh.class_position.detach(), class_before)


def test_gradients_reach_every_parameter():
    embed = PatchEmbedding(d_model=8, image_size=4, patch_size=2, channels=2, class_token=True)
    embed(torch.randn(3, 2, 4, 4)).square().sum().backward()
    for name, parameter in embed.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_transformer_classifies_images(pooling):
    config = ModelConfig(
        mode="classify",
        input="patches",
        image=ImageConfig(image_size=8, patch_size=2, channels=1),
        num_classes=10,
        pooling=pooling,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=2,
    )
    torch.manual_seed(0)
    model = Transformer(config, MoEConfig(num_experts=4, capacity_factor=4.0))  # no drops
    out = model(torch.randn(5, 1, 8, 8), targets=torch.arange(5))
    assert out.logits.shape == (5, 10)
    assert len(out.routing) == 1  # block 1 of 2 is MoE (every other block)
    assert out.routing[0].tokens_per_expert.sum() == 5 * (16 + (pooling == "cls"))
    out.loss.backward()
    assert (model.layers[0].embed.class_token is not None) == (pooling == "cls")


def test_model_image_section_goes_with_patches_only():
    with pytest.raises(ValueError, match="model.image is unset with model.input 'patches'"):
        Transformer(ModelConfig(mode="classify", input="patches"), None)
    image = ImageConfig(image_size=8, patch_size=2, channels=1)
    with pytest.raises(ValueError, match="model.image is set with model.input 'tokens'"):
        Transformer(ModelConfig(mode="classify", image=image), None, vocab_size=260)
