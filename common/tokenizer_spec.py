"""Facts read from a Hugging Face ``tokenizers`` spec (the JSON of tokenizer.json), for both sides that read
one: data.tokenizer (the tokenizer we train and load) and bert.hf (the tokenizer files an export writes).
Here rather than in either, because bert must not import data and both must answer alike.
"""

from __future__ import annotations


def lowercases(normalizer: dict | None) -> bool:
    """Whether a tokenizer with this ``normalizer`` spec lowercases its input: a BertNormalizer with
    ``lowercase`` (true when the key is absent, as in tokenizers and transformers), a Lowercase step, or a
    Sequence holding either. No normaliser, or one without such a step, keeps the case."""
    if not normalizer:
        return False
    kind = normalizer.get("type")
    if kind == "BertNormalizer":
        return bool(normalizer.get("lowercase", True))
    if kind == "Lowercase":
        return True
    if kind == "Sequence":
        return any(lowercases(n) for n in normalizer.get("normalizers") or [])
    return False
