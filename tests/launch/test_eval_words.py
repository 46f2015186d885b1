"""Evaluation follows the run's mode: the configured masking rate, the metrics that apply."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from launch import metrics, trainer
from launch.config import config_from_dict


class FakeEngine:
    """Returns uniform logits over 4 classes; records nothing."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(1, 1)

    def eval(self) -> None: ...

    def train(self) -> None: ...

    def __call__(self, inputs, padding_mask=None):
        return SimpleNamespace(logits=torch.zeros(*inputs.shape, 4), routing=[])


def test_masked_lm_evaluation_uses_the_configured_masking_probability(monkeypatch):
    seen = []

    def fake_make_inputs(batch, mode, data, probability, generator):
        seen.append(probability)
        tokens = batch.tokens
        return tokens, tokens % 4, None

    monkeypatch.setattr(trainer, "make_inputs", fake_make_inputs)
    batch = SimpleNamespace(tokens=torch.arange(8).reshape(2, 4))
    data = SimpleNamespace(tokenizer=SimpleNamespace(token_bytes=[1] * 8))
    trainer.evaluate(FakeEngine(), [batch], "masked_lm", data, seed=0, mlm_probability=0.4)
    assert seen == [0.4]


def test_classification_reports_accuracy_not_bits_per_byte():
    words = metrics.eval_words("classify", 0.5, float("nan"), 0.75)
    assert words == "val_loss 0.5000, val_accuracy 75.00%" and "bpb" not in words
    assert metrics.eval_words("causal_lm", 2.0, 2.9, None) == "val_loss 2.0000, val_bpb 2.9000"


def test_images_are_described_as_images_in_the_startup_line():
    from launch.config import load_config

    vit = load_config(trainer.Path(__file__).resolve().parents[2] / "configs" / "vit_digits.yaml")
    assert metrics.example_words(vit).startswith("images (") and "patches each" in (
        metrics.example_words(vit)
    )
    text = config_from_dict({})
    assert metrics.example_words(text) == f"sequences of {text.data.seq_len} tokens"


def test_classification_summary_has_no_bits_per_byte(capsys):
    result = trainer.TrainResult(
        run_dir=trainer.Path("runs/x"), step=10, loss=0.3, val_loss=0.2, val_bpb=float("nan"),
        tokens_per_s=100.0, seconds=1.0, val_accuracy=0.99,
    )  # fmt: skip
    metrics.print_summary(result, {"total": 10, "active": 5}, mode="classify")
    out = capsys.readouterr().out
    assert "val accuracy" in out and "bits per byte" not in out and "nan" not in out
