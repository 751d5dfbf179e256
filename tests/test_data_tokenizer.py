"""Tokenizer: training, round-trip, fingerprint stability, vocab.txt parity with transformers."""

import os

import pytest

from common.errors import DataError
from data.tokenizer import load_tokenizer, main

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new Café object; naïve datetimes are UNKNOWN.",
    "中文 text mixed with English, and punctuation!?",
    "def f(x): return x ** 2  # don't do this\twith tabs",
    "Supercalifragilisticexpialidocious words become ##pieces or [UNK].",
    "   leading and trailing spaces   ",
    "Numbers 1234567 and 3.14159 and e-mail foo@bar.com",
    "",
]


def _google_layout_vocab(tok_dir, path):
    """A vocab.txt laid out like Google's: [PAD]=0, [unused..], [UNK]=100 .. [MASK]=103."""
    tok = load_tokenizer(tok_dir)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    rest = [t for t in tok.vocab if t not in specials]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + specials[1:] + rest + ["中", "文"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return vocab


def test_trained_tokenizer_layout_and_roundtrip(data_tokenizer, tmp_path):
    tok = load_tokenizer(data_tokenizer)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 2000
    assert os.path.isfile(os.path.join(data_tokenizer, "vocab.txt"))
    assert len(tok.fingerprint) == 16 and int(tok.fingerprint, 16) >= 0
    assert any(t.startswith("##") for t in tok.vocab)
    # save -> load round trip keeps ids and fingerprint; loading the json, the txt and the dir agree
    tok.save(str(tmp_path / "copy"))
    variants = [load_tokenizer(str(tmp_path / "copy")),
                load_tokenizer(str(tmp_path / "copy" / "tokenizer.json")),
                load_tokenizer(str(tmp_path / "copy" / "vocab.txt"))]
    for other in variants:
        assert other.fingerprint == tok.fingerprint
        assert other.vocab == tok.vocab
        assert other.encode_ids(SENTENCES) == tok.encode_ids(SENTENCES)
    assert tok.convert_ids_to_tokens([0, 2, 3]) == ["[PAD]", "[CLS]", "[SEP]"]
    assert tok.id_to_token(tok.mask_id) == "[MASK]"
    # lower-casing and accent stripping
    assert tok.encode_ids(["CAFÉ"]) == tok.encode_ids(["cafe"])


def test_fingerprint_changes_with_vocab_and_normalisation(data_tokenizer, tmp_path):
    tok = load_tokenizer(data_tokenizer)
    vocab_path = os.path.join(data_tokenizer, "vocab.txt")
    assert load_tokenizer(vocab_path).fingerprint == tok.fingerprint  # stable across loads
    assert load_tokenizer(vocab_path, lowercase=False).fingerprint != tok.fingerprint
    swapped = list(tok.vocab)
    swapped[10], swapped[11] = swapped[11], swapped[10]
    (tmp_path / "vocab.txt").write_text("\n".join(swapped) + "\n", encoding="utf-8")
    assert load_tokenizer(str(tmp_path / "vocab.txt")).fingerprint != tok.fingerprint


def test_vocab_txt_ids_match_transformers(data_tokenizer, tmp_path):
    from transformers import BertTokenizerFast

    path = str(tmp_path / "vocab.txt")
    vocab = _google_layout_vocab(data_tokenizer, path)
    ours = load_tokenizer(path)
    hf = BertTokenizerFast.from_pretrained(str(tmp_path))  # a folder holding only vocab.txt
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 100, 101, 102, 103)
    assert ours.vocab_size == len(vocab) == hf.vocab_size
    for s in SENTENCES:
        assert ours.encode_ids([s])[0] == hf(s, add_special_tokens=False)["input_ids"], s
        ids, types = ours.encode_pair(s, None, max_length=512)
        assert ids == hf(s)["input_ids"] and types == hf(s)["token_type_ids"]
    for a, b in zip(SENTENCES[:-1], SENTENCES[1:-1]):  # HF treats text_b="" as no pair
        ids, types = ours.encode_pair(a, b, max_length=512)
        ref = hf(a, b)
        assert ids == ref["input_ids"] and types == ref["token_type_ids"]
    # truncation of a single sequence, and longest-first on a pair with unequal lengths
    ids, _ = ours.encode_pair(SENTENCES[1], None, max_length=6)
    assert ids == hf(SENTENCES[1], truncation=True, max_length=6)["input_ids"]
    a, b = SENTENCES[0], SENTENCES[1] * 3
    ids, types = ours.encode_pair(a, b, max_length=20)
    ref = hf(a, b, truncation="longest_first", max_length=20)
    assert len(ids) == 20 and ids == ref["input_ids"] and types == ref["token_type_ids"]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"vocab.txt.*\[UNK\]"):
        load_tokenizer(str(tmp_path / "vocab.txt"))
    (tmp_path / "v2.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[MASK\] is missing"):
        load_tokenizer(str(tmp_path / "v2.txt"))
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="bad.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_cli_trains_and_reports_errors(data_corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["--input", data_corpus, "--out", str(out), "--vocab-size", "500"]) == 0
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 500 and tok.pad_id == 0
    assert "fingerprint " + tok.fingerprint in capsys.readouterr().out
    # Training again gives the same specials and size and nearly the same vocabulary: `tokenizers` breaks
    # merge-count ties in (per-process random) hash order, so a few tokens may differ — and then the
    # fingerprint differs, which is exactly what it is for.
    assert main(["--input", data_corpus, "--out", str(tmp_path / "tok2"), "--vocab-size", "500"]) == 0
    tok2 = load_tokenizer(str(tmp_path / "tok2"))
    assert (tok2.vocab_size, tok2.pad_id, tok2.unk_id, tok2.cls_id, tok2.sep_id, tok2.mask_id) == \
        (tok.vocab_size, tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id)
    assert len(set(tok2.vocab) & set(tok.vocab)) >= 0.9 * tok.vocab_size
    assert (tok2.fingerprint == tok.fingerprint) == (tok2.vocab == tok.vocab)
    assert main(["--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.txt" in err


@pytest.mark.parametrize("normalizer, expected", [
    (None, False),
    ({"type": "BertNormalizer", "lowercase": False}, False),
    ({"type": "BertNormalizer"}, True),  # tokenizers' and transformers' default
    ({"type": "Lowercase"}, True),
    ({"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}, {"type": "StripAccents"}]}, True),
    ({"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "StripAccents"}]}, False),
    ({"type": "NFKC"}, False),
])
def test_lowercase_rule(normalizer, expected):
    from common.tokenizer_spec import lowercases

    assert lowercases(normalizer) is expected


def test_loaded_tokenizer_and_hf_export_agree_on_a_sequence_normaliser(tmp_path):
    """A tokenizer.json whose normaliser lowercases inside a Sequence (no ``lowercase`` key anywhere): the
    loaded tokenizer and the exported tokenizer_config.json both say it lowercases, as the ids show."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from bert import BertConfig
    from bert.hf import write_hf_tokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))

    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.tokenizer.encode("HELLO World").tokens == ["hello", "world"]
    assert loaded.lowercase is True
    write_hf_tokenizer(str(tmp_path / "tok"), str(tmp_path / "hf"), BertConfig(vocab_size=len(vocab)))
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["do_lower_case"] is True
