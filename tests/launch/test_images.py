"""Image data (launch/images.py): digits and folder loading, the fixed split, normalisation,
the shift augmentation against a per-image slicing oracle, config checks, and (slow) a
reduced ViT-MoE that learns the digits through `moeforge train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launch.config import config_from_dict, validate
from launch.data import DataConfig
from launch.errors import UserError
from launch.images import build_image_data, load_digits_images, load_images, shift_images
from moe.transformer import ModelConfig

REPO = Path(__file__).resolve().parents[2]


def image_model(size: int = 8, channels: int = 1, num_classes: int = 10) -> ModelConfig:
    image = {"image_size": size, "patch_size": 2, "channels": channels}
    return ModelConfig(mode="classify", input="patches", image=image, num_classes=num_classes)


def test_digits_are_the_bundled_8x8_images():
    found = load_digits_images()
    assert found.images.shape == (1797, 1, 8, 8) and found.images.dtype == torch.float32
    assert found.images.min() == 0 and found.images.max() == 16
    assert found.class_names == [str(i) for i in range(10)]
    assert torch.bincount(found.labels).min() >= 170  # about 180 per class


def test_split_is_fixed_disjoint_and_normalised_on_train_statistics():
    config = DataConfig(path="digits", val_fraction=0.2, split_seed=1234)
    data = build_image_data(config, image_model())
    again = build_image_data(config, image_model())
    assert len(data.train) == 1437 and len(data.val) == 360 and data.tokenizer is None
    torch.testing.assert_close(data.val.tokens, again.val.tokens, rtol=0, atol=0)
    assert torch.equal(data.val.labels, again.val.labels)
    assert abs(data.train.tokens.mean().item()) < 1e-5
    assert abs(data.train.tokens.std().item() - 1) < 1e-4
    # Every image lands in exactly one split (same class counts as the bundled set), and the
    # normalisation is one affine map: a raw 0 (background) is the training minimum.
    full = torch.bincount(load_digits_images().labels, minlength=10)
    split = torch.bincount(data.train.labels, minlength=10) + torch.bincount(
        data.val.labels, minlength=10
    )
    assert torch.equal(split, full)
    assert data.val.tokens.min() >= data.train.tokens.min() - 1e-6
    other = build_image_data(
        DataConfig(path="digits", val_fraction=0.2, split_seed=7), image_model()
    )
    assert not torch.equal(other.val.labels, data.val.labels)


def test_digits_resized_and_repeated_to_the_model_geometry():
    found = load_images("digits", channels=3, size=(16, 16))
    assert found.images.shape == (1797, 3, 16, 16)
    torch.testing.assert_close(found.images[:, 0], found.images[:, 2])
    # Antialiased bilinear upsampling by two keeps each image's mean grey level (edges aside).
    raw = load_digits_images().images
    torch.testing.assert_close(found.images[:, 0].mean(), raw.mean(), rtol=2e-2, atol=0)


def test_image_folder_classes_sizes_and_pixels(tmp_path):
    from PIL import Image

    for name, grey in (("b_cat", 51), ("a_dog", 204)):
        (tmp_path / name).mkdir()
        for index, size in enumerate([(5, 7), (12, 9), (4, 4)]):
            Image.new("L", size, color=grey).save(tmp_path / name / f"{index}.png")
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    found = load_images(str(tmp_path), channels=1, size=(6, 4))
    assert found.class_names == ["a_dog", "b_cat"]
    assert found.images.shape == (6, 1, 6, 4)
    assert found.labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(found.images[:3], torch.full((3, 1, 6, 4), 204 / 255))
    torch.testing.assert_close(found.images[3:], torch.full((3, 1, 6, 4), 51 / 255))
    rgb = load_images(str(tmp_path), channels=3, size=(2, 2))
    assert rgb.images.shape == (6, 3, 2, 2)
    data = build_image_data(
        DataConfig(path=str(tmp_path), val_fraction=0.34), image_model(size=4, num_classes=2)
    )
    assert len(data.train) + len(data.val) == 6 and len(data.val) == 3


def test_data_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="data.path .* is not a directory"):
        load_images(str(tmp_path / "missing"), 1, (8, 8))
    with pytest.raises(UserError, match="no class subdirectories"):
        load_images(str(tmp_path), 1, (8, 8))
    with pytest.raises(UserError, match="set data.path to 'digits'"):
        load_images(None, 1, (8, 8))
    with pytest.raises(UserError, match="has 10 classes but model.num_classes is 3"):
        build_image_data(DataConfig(path="digits"), image_model(num_classes=3))


@pytest.mark.parametrize("max_shift", [1, 2])
def test_shift_images_matches_slicing_of_the_padded_image(max_shift):
    images = torch.randn(5, 2, 6, 7)
    out = shift_images(images, max_shift, torch.Generator().manual_seed(3))
    offsets = torch.randint(
        0, 2 * max_shift + 1, (5, 2), generator=torch.Generator().manual_seed(3)
    )
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    for b, (dy, dx) in enumerate(offsets.tolist()):
        torch.testing.assert_close(out[b], padded[b, :, dy : dy + 6, dx : dx + 7], rtol=0, atol=0)
    assert not torch.equal(out, images)  # 5 draws of 9 or 25 offsets: some are non-zero
    assert shift_images(images, 0, torch.Generator()) is images


def test_validate_image_runs():
    base = {"model": image_model().model_dump(), "data": {"path": "digits"}}
    validate(config_from_dict(base), world_size=1)  # no label_field, seq_len irrelevant
    lm = json.loads(json.dumps(base))
    lm["model"]["mode"] = "causal_lm"
    with pytest.raises(UserError, match="set model.mode classify"):
        validate(config_from_dict(lm), world_size=1)
    labelled = json.loads(json.dumps(base))
    labelled["data"]["label_field"] = "label"
    with pytest.raises(UserError, match="data.label_field is not used with model.input patches"):
        validate(config_from_dict(labelled), world_size=1)


@pytest.mark.slow
def test_reduced_vit_moe_learns_digits(tmp_path):
    """A 2-block ViT-MoE for 100 steps: test accuracy far above chance (10%)."""
    sets = [
        "model.num_layers=2", "model.d_model=32", "model.d_ff=64", "model.num_heads=2",
        "train.steps=100", "train.eval_every=0", "logging.progress=false",
    ]  # fmt: skip
    command = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs/vit_digits.yaml")]
    command += ["--run-dir", str(tmp_path / "run"), *[f"--set={s}" for s in sets]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [100]
    assert evals[-1]["val_accuracy"] > 0.7, evals
    losses = [r["ce_loss"] for r in rows if "ce_loss" in r]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:1]), losses
    assert "val accuracy" in done.stdout
