"""bert/hf.py against transformers (test-only oracle): keys, fp32 parity both ways, head handling, tokenizer."""

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file

from bert import BertConfig, BertForPreTraining, BertModel
from bert.hf import from_hf, load_hf_state_dict, to_hf

SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             max_position_embeddings=40, type_vocab_size=2)


def hf_config(**overrides):
    return transformers.BertConfig(**{**SMALL, **overrides})


def perturb_(model, seed=0):
    """Non-trivial values everywhere (init leaves biases 0 and LayerNorm 1, which would hide mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # tied tensors appear once
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(seed=0):
    """Batch with padding (attention_mask zeros) and both token types."""
    g = torch.Generator().manual_seed(seed)
    B, S = 3, 11
    ids = torch.randint(5, SMALL["vocab_size"], (B, S), generator=g)
    lengths = torch.tensor([S, 7, 4])
    mask = (torch.arange(S)[None] < lengths[:, None]).long()
    tt = ((torch.arange(S)[None] >= lengths[:, None] // 2) & mask.bool()).long()
    return ids * mask, tt, mask


def assert_same_outputs(ours, theirs):
    ids, tt, mask = inputs()
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        o_base = ours.bert(ids, tt, mask)
        o = ours(ids, tt, mask)
        t_base = theirs.bert(input_ids=ids, token_type_ids=tt, attention_mask=mask)
        t = theirs(input_ids=ids, token_type_ids=tt, attention_mask=mask)
    real = mask.bool()  # HF also computes padded positions; compare everything, padded included
    assert real.sum() < real.numel()
    tol = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(o_base.last_hidden_state, t_base.last_hidden_state, **tol)
    torch.testing.assert_close(o_base.pooler_output, t_base.pooler_output, **tol)
    torch.testing.assert_close(o.prediction_logits, t.prediction_logits, **tol)
    torch.testing.assert_close(o.seq_relationship_logits, t.seq_relationship_logits, **tol)


def test_state_dict_keys_equal_transformers():
    ours = BertForPreTraining(BertConfig(**SMALL)).state_dict()
    theirs = transformers.BertForPreTraining(hf_config()).state_dict()
    assert set(ours) == set(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_hf_weights_into_ours_match_numerically(tmp_path):
    torch.manual_seed(0)
    theirs = perturb_(transformers.BertForPreTraining(hf_config()))
    theirs.save_pretrained(tmp_path)
    ours, report = from_hf(tmp_path, return_report=True)
    assert report.initialized == [] and report.dropped_heads == [] and not report.bare_model
    assert ours.config == BertConfig(**SMALL)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert_same_outputs(ours, theirs)


def test_ours_out_loads_in_transformers_with_no_missing_keys(tmp_path):
    torch.manual_seed(1)
    ours = perturb_(BertForPreTraining(BertConfig(**SMALL)))
    to_hf(ours, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "cls.predictions.decoder.weight" not in stored and "cls.predictions.decoder.bias" not in stored
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["model_type"] == "bert"
    assert {k: config[k] for k in SMALL} == SMALL

    theirs, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert theirs.cls.predictions.decoder.weight.data_ptr() == theirs.bert.embeddings.word_embeddings.weight.data_ptr()
    assert_same_outputs(ours, theirs)

    # And back: the round trip is exact.
    again = from_hf(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


def test_bare_bert_model_out_loads_in_transformers(tmp_path):
    ours = perturb_(BertModel(BertConfig(**SMALL)))
    to_hf(ours, tmp_path)
    theirs, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, tt, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids, tt, mask).pooler_output,
                                   theirs.eval()(input_ids=ids, token_type_ids=tt, attention_mask=mask).pooler_output,
                                   rtol=0, atol=1e-5)


HEADS = ["cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
         "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
         "cls.predictions.transform.dense.weight", "cls.seq_relationship.bias", "cls.seq_relationship.weight"]


def test_bare_bert_model_loads_with_heads_reported(tmp_path, caplog):
    theirs = perturb_(transformers.BertModel(hf_config()))
    theirs.save_pretrained(tmp_path)
    assert not any(k.startswith("bert.") for k in load_hf_state_dict(tmp_path)[1])  # really the bare layout
    with caplog.at_level(logging.WARNING, logger="bert.hf"):
        ours, report = from_hf(tmp_path, return_report=True)
    assert report.bare_model and report.initialized == HEADS
    for key in HEADS:
        assert key in caplog.text
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()["bert." + k], v), k
    # The freshly initialised heads follow BERT's init.
    assert torch.all(ours.cls.predictions.bias == 0)
    assert torch.all(ours.cls.predictions.transform.LayerNorm.weight == 1)


def test_other_head_checkpoints_drop_and_initialise_by_name(tmp_path, caplog):
    seq = perturb_(transformers.BertForSequenceClassification(hf_config(num_labels=3)))
    seq.save_pretrained(tmp_path / "seq")
    with caplog.at_level(logging.WARNING, logger="bert.hf"):
        ours, report = from_hf(tmp_path / "seq", return_report=True)
    assert report.dropped_heads == ["classifier.bias", "classifier.weight"]
    assert report.initialized == HEADS
    assert "classifier.weight" in caplog.text
    assert torch.equal(ours.bert.pooler.dense.weight, seq.bert.pooler.dense.weight)

    # BertForMaskedLM has no pooler and no NSP head: those are initialised, the MLM head is loaded.
    mlm = perturb_(transformers.BertForMaskedLM(hf_config()))
    mlm.save_pretrained(tmp_path / "mlm")
    ours, report = from_hf(tmp_path / "mlm", return_report=True)
    assert report.initialized == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                  "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert torch.equal(ours.cls.predictions.transform.dense.weight, mlm.cls.predictions.transform.dense.weight)
    assert torch.equal(ours.cls.predictions.bias, mlm.cls.predictions.bias)


def _write_checkpoint(directory, config: dict, state_dict: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(state_dict, directory / "pytorch_model.bin")


def test_old_style_torch_checkpoint(tmp_path):
    """pytorch_model.bin with LayerNorm.gamma/beta, the old persistent position_ids and the decoder alias."""
    theirs = perturb_(transformers.BertForPreTraining(hf_config()))
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.clone()
          for k, v in theirs.state_dict().items()}
    assert "cls.predictions.decoder.weight" in sd and "bert.embeddings.LayerNorm.gamma" in sd
    sd["bert.embeddings.position_ids"] = torch.arange(SMALL["max_position_embeddings"])[None]
    config = {**SMALL, "architectures": ["BertForPreTraining"], "model_type": "bert", "torch_dtype": "float32",
              "position_embedding_type": "absolute", "use_cache": True, "classifier_dropout": None,
              "transformers_version": "4.6.0", "gradient_checkpointing": False}
    _write_checkpoint(tmp_path, config, sd)
    ours, report = from_hf(tmp_path, return_report=True)
    assert report.renamed["bert.embeddings.LayerNorm.gamma"] == "bert.embeddings.LayerNorm.weight"
    assert report.ignored_buffers == ["bert.embeddings.position_ids"]
    assert report.initialized == []
    assert_same_outputs(ours, theirs)


def _pretraining_sd():
    return {k: v.clone() for k, v in BertForPreTraining(BertConfig(**SMALL)).state_dict().items()}


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("bert.encoder.layer.1.output.dense.weight"),
     r"missing encoder keys: \['bert.encoder.layer.1.output.dense.weight'\]"),
    (lambda sd: sd.__setitem__("bert.encoder.layer.2.output.dense.weight", torch.zeros(1)),
     r"unexpected keys: \['bert.encoder.layer.2.output.dense.weight'\]"),
    (lambda sd: sd.__setitem__("lm_head.weight", torch.zeros(1)), r"unexpected keys: \['lm_head.weight'\]"),
    (lambda sd: sd.__setitem__("bert.pooler.dense.weight", torch.zeros(3, 3)),
     r"bert.pooler.dense.weight: checkpoint \(3, 3\) vs model \(32, 32\)"),
    (lambda sd: sd["cls.predictions.decoder.weight"].add_(1.0), r"cls.predictions.decoder.weight differs"),
])
def test_key_mismatches_are_errors_listing_keys(tmp_path, edit, match):
    sd = _pretraining_sd()
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"].clone()
    edit(sd)
    _write_checkpoint(tmp_path, {**SMALL, "model_type": "bert"}, sd)
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path)


@pytest.mark.parametrize("extra,match", [
    ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key' is not supported"),
    ({"is_decoder": True}, r"is_decoder=True is not supported"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=False is not supported"),
    ({"model_type": "roberta"}, r"model_type is 'roberta', expected 'bert'"),
    ({"hidden_size": 30}, r"hidden_size \(30\) must be divisible"),
    ({"hidden_act": "silu"}, r"BertConfig.hidden_act"),
])
def test_unrepresentable_configs_are_refused(tmp_path, extra, match):
    _write_checkpoint(tmp_path, {**SMALL, **extra}, _pretraining_sd())
    with pytest.raises(ValueError, match=match):
        from_hf(tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        from_hf(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    with pytest.raises(ValueError, match="no weights found"):
        from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------- tokenizer

TEXTS = ["The Quick brown fox jumps over the lazy dog.", "Café déjà vu: naïve résumé, 42 times!",
         "Hello world, hello BERT tokenizers."]


def build_tokenizer_dir(directory):
    """A real lowercasing BERT WordPiece tokenizer (the pipeline of Google's BERT), built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(TEXTS * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (directory / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    return tok


@pytest.mark.parametrize("only_vocab_txt", [False, True])
def test_tokenizer_files_load_in_transformers(tmp_path, only_vocab_txt):
    tok = build_tokenizer_dir(tmp_path / "tok")
    if only_vocab_txt:
        (tmp_path / "tok" / "tokenizer.json").unlink()
        with pytest.raises(ValueError, match="pass do_lower_case"):
            to_hf(BertForPreTraining(BertConfig(**SMALL)), tmp_path / "bad", tmp_path / "tok")
    model = BertForPreTraining(BertConfig(**SMALL))  # vocab 120 >= the tokenizer's
    to_hf(model, tmp_path / "out", tmp_path / "tok", do_lower_case=True if only_vocab_txt else None)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert isinstance(hf_tok, transformers.BertTokenizerFast)
    assert hf_tok.do_lower_case is True
    for a, b in zip(TEXTS, TEXTS[1:] + TEXTS[:1]):
        want = tok.encode(a, b)
        got = hf_tok(a, b)
        assert got["input_ids"] == want.ids
        assert got["token_type_ids"] == want.type_ids
    assert hf_tok.pad_token_id == tok.token_to_id("[PAD]") == 0
    assert hf_tok.mask_token_id == tok.token_to_id("[MASK]")
    assert hf_tok.cls_token_id == tok.token_to_id("[CLS]")
    # The model written alongside still loads cleanly.
    _, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tokenizer_problems_are_errors(tmp_path):
    build_tokenizer_dir(tmp_path / "tok")
    with pytest.raises(ValueError, match="vocab_size is 50"):
        to_hf(BertForPreTraining(BertConfig(**{**SMALL, "vocab_size": 50})), tmp_path / "out", tmp_path / "tok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither tokenizer.json nor vocab.txt"):
        to_hf(BertForPreTraining(BertConfig(**SMALL)), tmp_path / "out", tmp_path / "empty")
