"""Models for the health scenarios, each standing for a kind of model users bring: activation
modules or none (``F.relu`` in ``forward``, an LSTM's gates, GPT-2's own GELU class), frozen and
unused parameters, initialisations that break a run."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from tbhealth.training.models import MLP


def mlp(in_features: int = 64, out_features: int = 10, hidden=(128, 64), activation: str = "relu",
        norm: str = "none", dropout: float = 0.0) -> nn.Module:
    return MLP(in_features, out_features, hidden=list(hidden), activation=activation, norm=norm, dropout=dropout)


def deep_relu_large_init(in_features: int = 64, out_features: int = 10, depth: int = 8, width: int = 128,
                         std: float = 0.5) -> nn.Module:
    """A deep ReLU net initialised with N(0, std) weights instead of ~N(0, 2/fan_in): every layer
    multiplies the signal by ~std·sqrt(width/2) (4x here), so the first loss is ~1e3 and the first
    gradients ~1e4, and plain SGD blows the loss up within a few steps."""
    model = mlp(in_features, out_features, hidden=[width] * depth)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, std)
    return model


def dead_layer_mlp(bias: float = -10.0) -> nn.Module:
    """The built-in MLP with fc2's bias at -10: its ReLU (act2) outputs 0 for every input."""
    model = mlp(hidden=(64, 64))
    with torch.no_grad():
        model.fc2.bias.fill_(bias)
    return model


class FunctionalMLP(nn.Module):
    """Activations called in ``forward`` (``F.relu``): no activation module to hook."""

    def __init__(self, in_features: int = 64, out_features: int = 10, width: int = 96):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(in_features, width), nn.Linear(width, width), nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DeepFunctionalSigmoid(nn.Module):
    """``depth`` linear layers joined by ``torch.sigmoid`` calls: vanishing gradients in a model
    with no activation module at all (only per-layer gradient norms can see it)."""

    def __init__(self, in_features: int = 64, out_features: int = 10, depth: int = 12, width: int = 32):
        super().__init__()
        sizes = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.out = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return self.out(x)


class FrozenAndUnused(nn.Module):
    """A frozen first layer (``requires_grad=False``, as when fine-tuning) and an auxiliary head
    that ``forward`` never calls: with ``zero_grad(set_to_none=False)`` its gradients are exact zeros."""

    def __init__(self, in_features: int = 64, out_features: int = 10):
        super().__init__()
        self.frozen = nn.Sequential(nn.Linear(in_features, 128), nn.ReLU())
        self.frozen.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, out_features))
        self.aux_head = nn.Linear(128, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(x))


class LSTMLanguageModel(nn.Module):
    """Next-token prediction: (N, T) tokens in, (N, vocab, T) logits out (CrossEntropyLoss's
    layout for sequence targets). The LSTM's sigmoid/tanh gates run inside its kernel."""

    def __init__(self, vocab: int = 12, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.out(h).transpose(1, 2)


class NewGELUActivation(nn.Module):
    """GPT-2's GELU (the tanh approximation), a parameter-free module of its own class, as in
    Hugging Face's GPT-2: not an ``nn.GELU``, yet an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention, then an MLP with GPT-2's GELU."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), NewGELUActivation(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A two-block causal transformer language model with (N, vocab, T) logits."""

    def __init__(self, vocab: int = 12, d: int = 32, heads: int = 2, blocks: int = 2, length: int = 24):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(1, length, d))
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(blocks)))
        self.ln, self.out = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]
        return self.out(self.ln(self.blocks(x))).transpose(1, 2)


class Hangs(nn.Module):
    """Wraps a model whose forward blocks for ``seconds`` on training call ``at_call``, as a
    forward waiting on a dead data source or a collective does."""

    def __init__(self, model: nn.Module, at_call: int, seconds: float):
        super().__init__()
        self.model, self.at_call, self.seconds, self.calls = model, at_call, seconds, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at_call:
                threading.Event().wait(self.seconds)  # blocks in a lock, like a hung collective
        return self.model(x)
