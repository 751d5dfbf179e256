"""BertConfig: Hugging Face's field names and defaults (BERT-base), Google's released sizes as presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F

# Google's released sizes (Turc et al. 2019 for the small ones): name -> (layers, hidden).
# Heads = hidden / 64 and intermediate = 4 * hidden throughout.
PRESETS = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}

# hidden_act names (HF's) -> the function.
ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact erf GELU, as Google's BERT and HF's "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertConfig:
    """Hugging Face's BertConfig field names and defaults (BERT-base)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive integer, got {value!r}")
        for name in ["hidden_dropout_prob", "attention_probs_dropout_prob"]:
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"BertConfig.{name} must be in [0, 1), got {value!r}")
        for name in ["layer_norm_eps", "initializer_range"]:
            if not getattr(self, name) > 0:
                raise ValueError(f"BertConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size)")

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """Google's released sizes: tiny, mini, small, medium, base, large; fields may be overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; valid presets: {', '.join(PRESETS)}")
        layers, hidden = PRESETS[name]
        fields = dict(num_hidden_layers=layers, hidden_size=hidden,
                      num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
        fields.update(overrides)
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Build from a dict; unknown keys are an error naming them (HF's extra keys are dropped by hf.py)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BertConfig field(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
