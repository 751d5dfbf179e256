"""bert/model.py: sizes, sparse loss, learning, bf16, input and config validation, init, SDPA."""

import pytest
import torch
import torch.nn.functional as F

from bert import PRESETS, BertConfig, BertForPreTraining, BertModel, count_parameters
from helpers import make_batch, tiny_config


# ---------------------------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name,expected", [("base", 109_482_240), ("large", 335_141_888)])
def test_parameter_counts_from_module_tree(name, expected):
    with torch.device("meta"):  # real module tree, no memory
        model = BertModel(BertConfig.preset(name))
        pretraining = BertForPreTraining(BertConfig.preset(name))
    assert count_parameters(model) == expected
    # Heads add transform (H*H + H + 2H), MLM bias V and NSP (2H + 2); the decoder weight is tied (not counted).
    c = BertConfig.preset(name)
    H, V = c.hidden_size, c.vocab_size
    assert count_parameters(pretraining) == expected + (H * H + 3 * H) + V + (2 * H + 2)


def test_presets_follow_google_sizes():
    for name, (layers, hidden) in PRESETS.items():
        c = BertConfig.preset(name)
        assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
        assert c.num_attention_heads * 64 == hidden and c.intermediate_size == 4 * hidden
        assert c.vocab_size == 30522 and c.max_position_embeddings == 512
    assert BertConfig.preset("tiny", vocab_size=100).vocab_size == 100
    assert BertConfig.from_dict(BertConfig.preset("mini").to_dict()) == BertConfig.preset("mini")


# ---------------------------------------------------------------------------------------------- loss

def test_sparse_loss_equals_full_logits_loss():
    torch.manual_seed(0)
    config = tiny_config()
    model = BertForPreTraining(config).eval()
    batch = make_batch(config)
    with torch.no_grad():
        out = model(**batch)
        full = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    B, P = batch["masked_lm_positions"].shape
    # Oracle: full (B, S, V) logits gathered at the labelled positions, weight-0 slots excluded.
    picked = full.prediction_logits[torch.arange(B)[:, None], batch["masked_lm_positions"]]  # (B, P, V)
    real = batch["masked_lm_weights"].bool()
    ref_mlm = F.cross_entropy(picked[real], batch["masked_lm_ids"][real])
    ref_nsp = F.cross_entropy(full.seq_relationship_logits, batch["next_sentence_label"])
    ref_acc = (picked[real].argmax(-1) == batch["masked_lm_ids"][real]).float().mean()
    ref_nsp_acc = (full.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).float().mean()
    torch.testing.assert_close(out.mlm_loss, ref_mlm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.nsp_loss, ref_nsp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_mlm + ref_nsp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mlm_acc, ref_acc)
    torch.testing.assert_close(out.nsp_acc, ref_nsp_acc)
    assert out.mlm_count.item() == real.sum().item() == B * P - 3
    assert out.nsp_count.item() == B
    torch.testing.assert_close(out.mlm_loss_sum / out.mlm_count, out.mlm_loss)
    assert torch.equal(out.mlm_predictions[real], picked[real].argmax(-1))

    # Padded slots carry no signal: changing their ids does not change the loss.
    changed = dict(batch, masked_lm_ids=torch.where(real, batch["masked_lm_ids"], torch.full_like(real, 7, dtype=torch.long)))
    with torch.no_grad():
        assert model(**changed).loss.item() == out.loss.item()


def test_overfits_one_batch():
    """The classic check that the whole path learns: a tiny model memorises one fixed batch."""
    torch.manual_seed(0)
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(config)
    batch = make_batch(config, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for step in range(400):
        loss = model(**batch).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert first > 3.0  # starts near ln(64) + ln(2) ≈ 4.85: it really had something to learn
    assert loss.item() < 0.05, f"loss {loss.item():.4f} after {step + 1} steps"
    # Training updated the shared tensor, so the tie still holds.
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_bf16_autocast_forward_backward_on_cpu():
    torch.manual_seed(0)
    config = tiny_config()
    model = BertForPreTraining(config)
    seen = []
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_batch(config))
    out.loss.backward()
    assert seen == [torch.bfloat16]  # the matmuls really ran in bf16
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("case,match", [
    ("id_too_large", r"input_ids must be in \[0, 64\) \(vocab_size\)"),
    ("id_negative", r"input_ids must be in \[0, 64\)"),
    ("token_type_too_large", r"token_type_ids must be in \[0, 2\) \(type_vocab_size\)"),
    ("too_long", r"sequence length 33 exceeds max_position_embeddings 32"),
    ("mask_shape", r"attention_mask shape"),
    ("position_too_large", r"masked_lm_positions must be in \[0, 8\)"),
])
def test_bad_inputs_raise_value_error(case, match):
    """Shapes are always checked; values only by a model built with check_values=True (each is a host sync)."""
    config = tiny_config()
    model = BertForPreTraining(config, check_values=True)
    ids = torch.randint(0, 64, (2, 8))
    tt = torch.zeros_like(ids)
    am = torch.ones_like(ids)
    if case == "id_too_large":
        ids[1, 3] = 64
    elif case == "id_negative":
        ids[0, 0] = -1
    elif case == "token_type_too_large":
        tt[0, 5] = 2
    elif case == "too_long":
        ids = torch.randint(0, 64, (2, 33))
        tt, am = torch.zeros_like(ids), torch.ones_like(ids)
    elif case == "mask_shape":
        am = torch.ones(2, 7, dtype=torch.long)
    labels = {}
    if case == "position_too_large":
        labels = dict(masked_lm_positions=torch.tensor([[1, 8], [2, 3]]), masked_lm_ids=torch.ones(2, 2).long(),
                      next_sentence_label=torch.zeros(2).long())
    with pytest.raises(ValueError, match=match):
        model(ids, tt, am, **labels)


def test_value_checks_are_opt_in():
    """The default model does not read input values back to the host (the data side checks samples): a token
    type of -1 reaches the embedding, which fails on its own; check_values=True names the input instead."""
    config = tiny_config()
    ids, tt = torch.randint(0, 64, (2, 8)), torch.zeros(2, 8, dtype=torch.long)
    tt[0, 0] = -1
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        BertModel(config, check_values=True)(ids, tt)
    with pytest.raises((IndexError, RuntimeError)) as e:
        BertModel(config)(ids, tt)
    assert not isinstance(e.value, ValueError)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=30, num_attention_heads=4), r"hidden_size \(30\) must be divisible by num_attention_heads \(4\)"),
    (dict(vocab_size=0), r"BertConfig.vocab_size must be a positive integer"),
    (dict(num_hidden_layers=-1), r"BertConfig.num_hidden_layers must be a positive integer"),
    (dict(intermediate_size=0), r"BertConfig.intermediate_size"),
    (dict(max_position_embeddings=0), r"BertConfig.max_position_embeddings"),
    (dict(hidden_dropout_prob=1.0), r"BertConfig.hidden_dropout_prob"),
    (dict(hidden_act="swish9"), r"BertConfig.hidden_act"),
    (dict(pad_token_id=64), r"BertConfig.pad_token_id"),
])
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**kwargs)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown BERT preset 'huge'.*tiny, mini, small, medium, base, large"):
        BertConfig.preset("huge")


def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown BertConfig field\(s\): hiden_size"):
        BertConfig.from_dict({"hiden_size": 128})
    with pytest.raises(ValueError, match=r"num_layers"):
        BertConfig.preset("tiny", num_layers=3)


# ---------------------------------------------------------------------------------------------- init

def test_initialisation_matches_bert():
    torch.manual_seed(0)
    config = tiny_config(vocab_size=2000, hidden_size=128, intermediate_size=512, initializer_range=0.05)
    model = BertForPreTraining(config)
    std = config.initializer_range
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w = module.weight.detach()
            if isinstance(module, torch.nn.Embedding) and module.padding_idx is not None:
                assert torch.all(w[module.padding_idx] == 0), name
                w = torch.cat([w[:module.padding_idx], w[module.padding_idx + 1:]])
            # Sample std of n normals has relative s.e. 1/sqrt(2n): 5 s.e. with n >= 256 is <= 22%.
            n = w.numel()
            assert abs(w.std().item() - std) < 5 * std / (2 * n) ** 0.5, (name, w.std().item())
            assert abs(w.mean().item()) < 5 * std / n ** 0.5, name
            if getattr(module, "bias", None) is not None:
                assert torch.all(module.bias == 0), name
            checked += 1
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    assert checked == 3 + 6 * config.num_hidden_layers + 1 + 1 + 1 + 1  # emb, layers, pooler, transform, decoder, nsp
    assert torch.all(model.cls.predictions.bias == 0)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


# ---------------------------------------------------------------------------------------------- attention

def test_attention_uses_sdpa_with_padding_mask(monkeypatch):
    config = tiny_config()
    model = BertModel(config).eval()
    batch = make_batch(config)
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append(attn_mask)
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert len(calls) == config.num_hidden_layers
    B, S = batch["input_ids"].shape
    for mask in calls:
        assert mask.shape == (B, 1, 1, S) and mask.dtype == torch.bool
        assert torch.equal(mask[:, 0, 0], batch["attention_mask"].bool())
    calls.clear()
    with torch.no_grad():
        model(batch["input_ids"])
    assert calls == [None] * config.num_hidden_layers

    # The mask works: what sits in the padded slots cannot change the real positions' outputs.
    noise = torch.randint(5, config.vocab_size, (B, S)) * (1 - batch["attention_mask"])
    with torch.no_grad():
        out2 = model(batch["input_ids"] + noise, batch["token_type_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out2.last_hidden_state[real], out.last_hidden_state[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(out2.pooler_output, out.pooler_output, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- unpadding

def test_unpadded_encoder_equals_padded_on_real_positions():
    config = tiny_config()
    model = BertModel(config).eval()
    batch = make_batch(config)
    args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    with torch.no_grad():
        full = model(*args)
        packed = model(*args, unpad=True)
    real = batch["attention_mask"].bool()
    assert (~real).any()  # the batch has padding to skip
    torch.testing.assert_close(packed.last_hidden_state[real], full.last_hidden_state[real], rtol=0, atol=1e-5)
    assert torch.equal(packed.last_hidden_state[~real], torch.zeros_like(packed.last_hidden_state[~real]))
    torch.testing.assert_close(packed.pooler_output, full.pooler_output, rtol=0, atol=1e-5)


def test_pretraining_loss_and_gradients_unchanged_by_unpadding():
    """The loss path unpads; its loss and every gradient equal the padded computation's."""
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(config).train()
    batch = make_batch(config)
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    out = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # padded
    ref = model._pretraining_loss(out.last_hidden_state, model.cls.seq_relationship(out.pooler_output),
                                  batch["masked_lm_positions"], batch["masked_lm_ids"], batch["masked_lm_weights"],
                                  batch["next_sentence_label"]).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-6)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
