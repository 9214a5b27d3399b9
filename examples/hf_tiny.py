"""A Hugging Face ``Trainer`` on a tiny BERT built from a config (random weights: no download),
monitored by tbhealth. The data are the 8x8 digits shipped with scikit-learn, each image read as a
sequence of 64 tokens (pixel intensities 0-16), so no tokenizer is needed either.

    python examples/hf_tiny.py --output-dir hf_runs                   then   tbhealth board hf_runs/runs
    python examples/hf_tiny.py --output-dir hf_runs --resume          continue from the newest checkpoint-N

From another shell: ``tbhealth pause|resume|stop|checkpoint tbhealth --logdir hf_runs/runs``.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from tbhealth.integrations.transformers import TBHealthCallback
from tbhealth.training.data import digits


class DigitTokens(Dataset):
    """Digits as token sequences: ``{"input_ids": (64,), "labels": ()}``, what the Trainer feeds a model."""

    def __init__(self, tensors: tuple[torch.Tensor, torch.Tensor]):
        self.x, self.y = tensors[0].round().long().clamp(0, 16), tensors[1]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.y[i]}


def tiny_bert() -> BertForSequenceClassification:
    """About 9k parameters: one layer, hidden size 24, randomly initialised from the config."""
    config = BertConfig(vocab_size=17, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, num_labels=10)
    return BertForSequenceClassification(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="hf_runs", help="TrainingArguments(output_dir=...)")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=-1, help="train by steps instead of epochs")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--resume", action="store_true", help="resume_from_checkpoint=True")
    return parser.parse_args(argv)


def accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main(args: argparse.Namespace, model: torch.nn.Module | None = None, **monitoring) -> Trainer:
    """Train; ``monitoring``: more TBHealthCallback arguments (``health=...``)."""
    torch.manual_seed(0)
    train, val = digits(val_fraction=0.2, seed=0)
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=32, learning_rate=5e-3, logging_steps=args.logging_steps,
        gradient_accumulation_steps=args.accumulate, eval_strategy="epoch", save_strategy="no",
        report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model or tiny_bert(), args=training_args, train_dataset=DigitTokens(train.tensors),
                      eval_dataset=DigitTokens(val.tensors), compute_metrics=accuracy,
                      callbacks=[TBHealthCallback(**monitoring)])
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return trainer


if __name__ == "__main__":
    main(parse_args())
