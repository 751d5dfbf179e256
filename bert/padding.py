"""Unpadding: run per-token work on the real tokens only (after Mosaic BERT's bert_padding.py).

A batch (B, S) of sequences padded to the longest one carries B*S positions of which T are real. Every
part of an encoder layer except attention treats tokens independently, so it can run on the packed (T, H)
rows; attention needs the (B, S) layout back to know which tokens share a sequence. On the demo's shards
48% of the positions are padding, which is the work this saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a (B, S) batch sit: ``index`` (T,) into the flattened B*S positions."""

    index: torch.Tensor
    batch: int
    seq_len: int


def unpad(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, Packing]:
    """(B, S, H) and a (B, S) mask of real tokens -> the real rows (T, H) and their Packing."""
    B, S = attention_mask.shape
    index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (T,)
    return x.reshape(B * S, -1).index_select(0, index), Packing(index, B, S)


def pad(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(T, H) -> (B, S, H) with zeros at the padded positions (differentiable: index_copy)."""
    B, S = packing.batch, packing.seq_len
    return x.new_zeros(B * S, x.shape[-1]).index_copy(0, packing.index, x).view(B, S, -1)


def repack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(B, S, H) -> (T, H): the inverse of ``pad``."""
    return x.reshape(packing.batch * packing.seq_len, -1).index_select(0, packing.index)
