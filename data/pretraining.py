"""Google's create_pretraining_data algorithm over token-id lists (one pool of documents at a time).

``create_instances_from_document`` is a line-by-line transcription of google-research/bert's function
(same branches, same RNG draw points, on int lists instead of strings). Masking
(``mask_instances``) is vectorised with numpy over all instances of a pool but draws from the same
distribution as Google's ``create_masked_lm_predictions``: a uniformly random ordering of the
candidate groups, groups taken greedily (a group that would overflow ``num_to_predict`` is skipped),
then per chosen wordpiece 80% [MASK] / 10% kept / 10% random id from the whole vocabulary.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Params:
    max_seq_len: int = 128
    max_predictions: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    whole_word_mask: bool = False
    seed: int = 12345


@dataclass
class Instances:
    """Unmasked instances of one pool: token lists ([CLS] A [SEP] B [SEP]), first-[SEP] index, label."""

    tokens: list[list[int]]
    sep_index: list[int]
    is_random_next: list[int]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and Python versions (no hash())."""
    h = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def truncate_seq_pair(a: list[int], b: list[int], max_num_tokens: int, rng: random.Random):
    """Google's truncate_seq_pair (longer side, B on ties; front or back with p=0.5), O(removed)."""
    la, lb = len(a), len(b)
    fa = ba = fb = bb = 0
    rnd = rng.random
    while la + lb > max_num_tokens:
        if la > lb:
            if rnd() < 0.5:
                fa += 1
            else:
                ba += 1
            la -= 1
        else:
            if rnd() < 0.5:
                fb += 1
            else:
                bb += 1
            lb -= 1
    if fa or ba:
        a = a[fa:len(a) - ba]
    if fb or bb:
        b = b[fb:len(b) - bb]
    return a, b


def create_instances_from_document(
    all_documents: list[list[list[int]]], document_index: int, p: Params, rng: random.Random,
    cls_id: int, sep_id: int, out: Instances, stats: dict,
) -> None:
    document = all_documents[document_index]
    max_num_tokens = p.max_seq_len - 3
    target_seq_length = max_num_tokens
    stats["target_draws"] += 1
    if rng.random() < p.short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
        stats["short_target_draws"] += 1
    current_chunk: list[list[int]] = []
    current_length = 0
    i = 0
    n = len(document)
    while i < n:
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == n - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a: list[int] = []
                for j in range(a_end):
                    tokens_a.extend(current_chunk[j])
                tokens_b: list[int] = []
                forced = len(current_chunk) == 1
                if forced or rng.random() < 0.5:
                    is_random_next = 1
                    stats["forced_random_next"] += forced
                    target_b_length = target_seq_length - len(tokens_a)
                    # Google: up to 10 tries for another document; with a single-document pool the
                    # "random" B therefore comes from the same document (still labelled random).
                    for _ in range(10):
                        random_document_index = rng.randint(0, len(all_documents) - 1)
                        if random_document_index != document_index:
                            break
                    random_document = all_documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    # The unused segments of this chunk are put back.
                    i -= len(current_chunk) - a_end
                else:
                    is_random_next = 0
                    for j in range(a_end, len(current_chunk)):
                        tokens_b.extend(current_chunk[j])
                tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                assert tokens_a and tokens_b
                toks = [cls_id]
                toks += tokens_a
                toks.append(sep_id)
                toks += tokens_b
                toks.append(sep_id)
                out.tokens.append(toks)
                out.sep_index.append(len(tokens_a) + 1)
                out.is_random_next.append(is_random_next)
            current_chunk = []
            current_length = 0
        i += 1


def create_instances(docs: list[list[list[int]]], p: Params, seed_parts: tuple, cls_id: int,
                     sep_id: int, stats: dict) -> Instances:
    """All dupe passes over a pool of documents, then the instances shuffled (within the pool)."""
    out = Instances([], [], [])
    for dupe in range(p.dupe_factor):
        rng = random.Random(derive_seed(*seed_parts, "pass", dupe))
        for di in range(len(docs)):
            create_instances_from_document(docs, di, p, rng, cls_id, sep_id, out, stats)
    order = list(range(len(out.tokens)))
    random.Random(derive_seed(*seed_parts, "shuffle")).shuffle(order)
    return Instances([out.tokens[k] for k in order], [out.sep_index[k] for k in order],
                     [out.is_random_next[k] for k in order])


def num_to_predict(length: int | np.ndarray, max_predictions: int, masked_lm_prob: float):
    """Google: min(max_predictions, max(1, round(len(tokens) * masked_lm_prob))), half to even as Python's
    round; len counts [CLS]/[SEP]: 128 -> round(19.2) = 19, 512 -> round(76.8) = 77. The one copy of the rule
    (builder, load-time re-masking, inspector, benchmark batches)."""
    n = np.minimum(max_predictions, np.maximum(1, np.round(np.asarray(length) * masked_lm_prob)))
    return int(n) if np.ndim(n) == 0 else n.astype(np.int64)


@dataclass
class Masked:
    ids: np.ndarray  # flat output ids (masking applied), int64
    offsets: np.ndarray  # instance i occupies ids[offsets[i]:offsets[i+1]]
    pos: np.ndarray  # flat masked positions (within-instance), grouped by instance, ascending
    pos_offsets: np.ndarray
    labels: np.ndarray  # original ids at pos
    n_mask: int = 0
    n_keep: int = 0
    n_random: int = 0


def mask_instances(inst: Instances, p: Params, rng: np.random.Generator, vocab_size: int,
                   cls_id: int, sep_id: int, mask_id: int, is_continuation: np.ndarray | None) -> Masked:
    lens = np.fromiter((len(t) for t in inst.tokens), np.int64, len(inst.tokens))
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    total = int(offsets[-1])
    tokens = np.fromiter(itertools.chain.from_iterable(inst.tokens), np.int64, total)
    inst_of = np.repeat(np.arange(len(lens)), lens)
    pos_in = np.arange(total) - np.repeat(offsets[:-1], lens)
    cand = (tokens != cls_id) & (tokens != sep_id)
    k = num_to_predict(lens, p.max_predictions, p.masked_lm_prob)
    if not p.whole_word_mask:
        # A uniformly random ordering of the candidates of each instance; take the first k.
        key = np.where(cand, rng.random(total) * 0.5, 0.75) + inst_of
        order = np.argsort(key, kind="stable")
        rank = np.empty(total, np.int64)
        rank[order] = pos_in
        chosen = cand & (rank < k[inst_of])
    else:
        # Groups: a '##' piece joins the previous candidate's group (as Google: even across [SEP]).
        cont = is_continuation[tokens] if is_continuation is not None else np.zeros(total, bool)
        start = cand & ~(cont & (pos_in >= 2))
        group = np.cumsum(start) - 1  # group id of each candidate position
        n_groups = int(start.sum())
        gsize = np.bincount(group[cand], minlength=n_groups)
        ginst = inst_of[start]
        gkey = rng.random(n_groups)
        gorder = np.lexsort((gkey, ginst))  # groups of each instance in random order
        gbounds = np.searchsorted(ginst[gorder], np.arange(len(lens) + 1))
        sel = np.zeros(n_groups, bool)
        gorder_l, gsize_l, k_l, gb = gorder.tolist(), gsize.tolist(), k.tolist(), gbounds.tolist()
        for i in range(len(lens)):
            need, taken = k_l[i], 0
            for g in gorder_l[gb[i]:gb[i + 1]]:
                if taken >= need:
                    break
                s = gsize_l[g]
                if taken + s > need:
                    continue
                sel[g] = True
                taken += s
        chosen = cand & sel[np.where(cand, group, 0)]
    where = np.flatnonzero(chosen)
    labels = tokens[where]
    r = rng.random(len(where))
    out = tokens.copy()
    is_mask = r < 0.8
    is_rand = r >= 0.9
    out[where[is_mask]] = mask_id
    n_rand = int(is_rand.sum())
    out[where[is_rand]] = rng.integers(0, vocab_size, n_rand)
    counts = np.bincount(inst_of[where], minlength=len(lens))
    pos_offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(counts, out=pos_offsets[1:])
    n_mask = int(is_mask.sum())
    return Masked(out, offsets, pos_in[where], pos_offsets, labels, n_mask,
                  len(where) - n_mask - n_rand, n_rand)
