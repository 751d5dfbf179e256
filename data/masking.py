"""Dynamic re-masking at load time (Google's create_masked_lm_predictions rules, without whole-word masking).

The shards store examples with a mask already applied (``input_ids`` carries [MASK]/random/kept tokens at
``masked_lm_positions``, the originals are ``masked_lm_ids``). Re-masking therefore first writes the originals
back, then draws a fresh set of positions:

- candidates: every position except [CLS] and [SEP] (padding is never present: samples are unpadded);
- as many as ``data.pretraining.num_to_predict`` gives (128 tokens -> 19, 512 -> 77);
- each chosen position: 80% -> [MASK], 10% -> keep the original, 10% -> a uniformly random id of the
  vocabulary (Google draws from the whole vocabulary, specials included);
- output positions sorted ascending with their original ids.

The generator is seeded from (seed, epoch, sample key) only, so a sample gets the same mask whichever rank,
worker or resume position loads it: exact resume keeps holding with re-masking on.
"""

from __future__ import annotations

import hashlib

import numpy as np

from data.pretraining import num_to_predict


def restore_original(input_ids: np.ndarray, positions: np.ndarray, original_ids: np.ndarray) -> np.ndarray:
    """Copy of ``input_ids`` with the stored originals written back at the masked positions."""
    out = np.array(input_ids, copy=True)
    out[np.asarray(positions, np.int64)] = original_ids
    return out


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Generator for one sample: a stable 64-bit hash of the key (not Python's salted ``hash``)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), h & 0xFFFFFFFF, h >> 32, 0x6D61736B])


def remask(tokens: np.ndarray, rng: np.random.Generator, *, max_predictions: int, masked_lm_prob: float,
           vocab_size: int, cls_id: int, sep_id: int, mask_id: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask the ORIGINAL ``tokens`` (L,) afresh -> (input_ids (L,), positions (n,), original ids (n,))."""
    tokens = np.asarray(tokens)
    cand = np.flatnonzero((tokens != cls_id) & (tokens != sep_id))  # (C,)
    n = min(num_to_predict(len(tokens), max_predictions, masked_lm_prob), len(cand))
    chosen = np.sort(rng.permutation(cand)[:n])  # (n,) ascending, as Google sorts by position
    out = tokens.copy()
    u = rng.random(n)  # one draw per position decides 80/10/10
    rand_ids = rng.integers(0, vocab_size, n)
    new = np.where(u < 0.8, mask_id, np.where(u < 0.9, tokens[chosen], rand_ids))
    out[chosen] = new
    return out, chosen.astype(np.int32), tokens[chosen].astype(np.int32)
