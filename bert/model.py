"""BERT (Devlin et al., 2018) for pretraining (MLM + NSP), in one file.

Module names follow Hugging Face's modeling_bert, so the state-dict keys are identical and checkpoints map
1:1 (`bert.embeddings.word_embeddings.weight`, ..., `cls.predictions.decoder.weight` tied to the word
embeddings, `cls.seq_relationship`). The code is single-device: no DeepSpeed, no CLI, no globals.
Attention is `scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA), dropout is
`nn.Dropout`; host-specific kernels (trainer/cpu.py on CPUs) are swapped in from outside, never here.

Shapes: B batch, S sequence length, H hidden size, N heads, D = H / N head size, V vocabulary,
P masked-LM predictions per sequence, T real (non-padding) tokens in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bert.config import ACTIVATIONS, BertConfig
from bert import padding
from bert.padding import Packing


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor],
                   dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v, dropout on the probabilities; (B, N, S, D) in and out. attn_mask:
    (B, 1, 1, S) bool, True = a key the query may attend to."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


# ----------------------------------------------------------------------------------------------
# Outputs (HF's field names)


@dataclass
class BertModelOutput:
    last_hidden_state: torch.Tensor  # (B, S, H)
    pooler_output: torch.Tensor  # (B, H)


@dataclass
class BertForPreTrainingOutput:
    prediction_logits: torch.Tensor  # (B, S, V)
    seq_relationship_logits: torch.Tensor  # (B, 2)


@dataclass
class PreTrainingLossOutput:
    """Losses of the sparse prediction path, plus the counts that make metrics exactly aggregable."""

    loss: torch.Tensor  # mlm_loss + nsp_loss, what backward() sees
    mlm_loss: torch.Tensor  # mean over real predictions in the batch
    nsp_loss: torch.Tensor  # mean over sequences
    mlm_acc: torch.Tensor
    nsp_acc: torch.Tensor
    mlm_loss_sum: torch.Tensor  # sums and counts, detached, for exact averages over many batches
    mlm_correct: torch.Tensor
    mlm_count: torch.Tensor
    nsp_loss_sum: torch.Tensor
    nsp_correct: torch.Tensor
    nsp_count: torch.Tensor
    mlm_predictions: torch.Tensor  # (B, P) argmax ids at masked_lm_positions, for Input/Target/Predicted


# ----------------------------------------------------------------------------------------------
# Encoder


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Non-persistent, as in HF: they are not part of the checkpoint.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0),
                             persistent=False)
        self.register_buffer("token_type_ids", torch.zeros(1, config.max_position_embeddings, dtype=torch.long),
                             persistent=False)

    def forward(self, input_ids, token_type_ids):
        S = input_ids.shape[1]
        x = self.word_embeddings(input_ids)  # (B, S, H)
        x = x + self.position_embeddings(self.position_ids[:, :S])  # (1, S, H) broadcast
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.attend = sdpa_attention  # the kernel; a host may swap in its own (same signature)

    def forward(self, x, attn_mask, packing: Optional[Packing] = None):
        """x: (B, S, H), or the real tokens (T, H) of an unpadded batch with their `packing`."""
        B, S = x.shape[:2] if packing is None else (packing.batch, packing.seq_len)

        def heads(t):  # (B, S, H) or (T, H) -> (B, N, S, D); padded slots of an unpadded batch are 0
            t = t if packing is None else padding.pad(t, packing)
            return t.view(B, S, self.num_heads, self.head_size).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        out = self.attend(q, k, v, attn_mask, self.dropout_p if self.training else 0.0)  # (B, N, S, D)
        out = out.transpose(1, 2).reshape(B, S, -1)  # (B, S, H)
        return out if packing is None else padding.repack(out, packing)


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual + post-LayerNorm (BERT is post-LN)."""

    def __init__(self, config: BertConfig, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, x, attn_mask, packing=None):
        return self.output(self.self(x, attn_mask, packing), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))  # (B, S, 4H)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)  # HF's BertOutput has the same shape

    def forward(self, x, attn_mask, packing=None):
        x = self.attention(x, attn_mask, packing)  # the rest of the layer is per token: (T, H) works as is
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x, attn_mask, packing=None):
        for layer in self.layer:
            x = layer(x, attn_mask, packing)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))  # (B, H) from the [CLS] position


class BertPreTrainedModel(nn.Module):
    """Shared initialisation: BERT's truncated-normal is approximated by normal(0, 0.02) as in HF."""

    config: BertConfig
    check_values: bool = False  # read input values back to check their range (a host sync each forward)

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def check_inputs(self, input_ids, token_type_ids, attention_mask):
        """Turn shape errors from deep inside into a ValueError that says which input is wrong. Shapes are
        host facts, free to check; the values only with ``check_values`` (``check_range``)."""
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        S = input_ids.shape[1]
        if S > c.max_position_embeddings:
            raise ValueError(f"sequence length {S} exceeds max_position_embeddings {c.max_position_embeddings}")
        for name, t in (("token_type_ids", token_type_ids), ("attention_mask", attention_mask)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if self.check_values:
            check_range("input_ids", input_ids, c.vocab_size, "vocab_size")
            if token_type_ids is not None:
                check_range("token_type_ids", token_type_ids, c.type_vocab_size, "type_vocab_size")


def check_range(name: str, t: torch.Tensor, end: int, what: str) -> None:
    """ValueError unless every value of ``t`` is in [0, end). Reading the range back is a host sync (a pipeline
    drain on a GPU), so the model runs it only when built with ``check_values=True`` (a debugging aid): the
    training data is checked where it is made (data.shards.check_sample, per sample, on the host)."""
    if not t.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < 0 or hi >= end:
        raise ValueError(f"{name} must be in [0, {end}) ({what}), got values in [{lo}, {hi}]")


class BertModel(BertPreTrainedModel):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, check_values: bool = False):
        super().__init__()
        self.config, self.check_values = config, check_values
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.apply(self._init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, unpad: bool = False) -> BertModelOutput:
        """unpad=True runs the encoder's per-token work (all its matmuls but attention's two) on the real
        tokens only (bert/padding.py) and returns 0 at padded positions; real positions and the pooler are
        unchanged. A batch without padding is given without ``attention_mask`` (the loader knows, on the host):
        asking the device whether the mask is all ones would be a host sync every forward."""
        self.check_inputs(input_ids, token_type_ids, attention_mask)
        B, S = input_ids.shape
        if token_type_ids is None:
            token_type_ids = self.embeddings.token_type_ids[:, :S].expand(B, S)
        attn_mask = None
        if attention_mask is not None:
            attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S): keys a query may attend to
        x = self.embeddings(input_ids, token_type_ids)  # (B, S, H)
        packing = None
        if unpad and attention_mask is not None:
            x, packing = padding.unpad(x, attention_mask)  # (T, H)
        x = self.encoder(x, attn_mask, packing)  # (B, S, H) or (T, H)
        if packing is not None:
            x = padding.pad(x, packing)  # (B, S, H), zeros at padding
        pooled = self.pooler(x) if self.pooler is not None else None
        return BertModelOutput(last_hidden_state=x, pooler_output=pooled)


# ----------------------------------------------------------------------------------------------
# Pretraining heads


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # The decoder's weight is the word-embedding matrix (tied by BertForPreTraining) and its bias is
        # self.bias: HF's state dict lists both names for the same tensors.
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.bias = self.bias

    def forward(self, x):
        return self.decoder(self.transform(x))  # (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


class BertForPreTraining(BertPreTrainedModel):
    def __init__(self, config: BertConfig, check_values: bool = False):
        """check_values: check the range of token ids, token types and masked positions every forward (a host
        sync each: for debugging inputs that did not come through data.shards' checks)."""
        super().__init__()
        self.config, self.check_values = config, check_values
        self.bert = BertModel(config, check_values=check_values)
        self.cls = BertPreTrainingHeads(config)
        self.apply(self._init_weights)
        nn.init.zeros_(self.cls.predictions.bias)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tie (V, H)
        self.unpad = True  # the loss path skips padding (bert/padding.py); False only to measure it

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                masked_lm_positions=None, masked_lm_ids=None, masked_lm_weights=None,
                next_sentence_label=None):
        """Without labels: full logits (HF's outputs). With labels: the sparse pretraining loss.

        masked_lm_positions/ids/weights: (B, P), padded; weights are 1.0 for real predictions, 0.0 for pad.
        next_sentence_label: (B,), 1 = random next (Google's convention), 0 = is next.
        """
        # The loss reads only real positions ([CLS] and the predicted ones), so padding can be skipped.
        out = self.bert(input_ids, token_type_ids, attention_mask, unpad=self.unpad and masked_lm_positions is not None)
        nsp_logits = self.cls.seq_relationship(out.pooler_output)  # (B, 2)
        if masked_lm_positions is None:
            return BertForPreTrainingOutput(
                prediction_logits=self.cls.predictions(out.last_hidden_state),  # (B, S, V)
                seq_relationship_logits=nsp_logits)
        return self._pretraining_loss(out.last_hidden_state, nsp_logits, masked_lm_positions, masked_lm_ids,
                                      masked_lm_weights, next_sentence_label)

    def _pretraining_loss(self, hidden, nsp_logits, positions, ids, weights, nsp_label) -> PreTrainingLossOutput:
        B, S, H = hidden.shape
        if ids is None or nsp_label is None:
            raise ValueError("the pretraining loss needs masked_lm_positions, masked_lm_ids and next_sentence_label")
        if positions.shape != ids.shape:
            raise ValueError(f"masked_lm_positions shape {tuple(positions.shape)} != masked_lm_ids shape "
                             f"{tuple(ids.shape)}")
        if self.check_values:
            check_range("masked_lm_positions", positions, S, "the batch's sequence length")
        if weights is None:  # no pad marker given: every slot is a real prediction
            weights = torch.ones_like(ids, dtype=torch.float32)
        # Sparse prediction: project to the vocabulary only at the P labelled positions (about 15% of S),
        # which saves (1 - P/S) of the largest matmul: at S=128, P=20 that is 84% of 2*H*V FLOPs per token.
        index = positions.long().unsqueeze(-1).expand(-1, -1, H)  # (B, P, H)
        picked = torch.gather(hidden, 1, index)  # (B, P, H)
        logits = self.cls.predictions(picked).float()  # (B, P, V), fp32 for a stable log-softmax
        V = logits.shape[-1]
        w = weights.float().reshape(-1)  # (B*P,)
        token_loss = F.cross_entropy(logits.reshape(-1, V), ids.long().reshape(-1), reduction="none")
        mlm_count = w.sum()
        mlm_loss_sum = (token_loss * w).sum()
        mlm_loss = mlm_loss_sum / mlm_count.clamp(min=1.0)
        predictions = logits.argmax(-1)  # (B, P)
        mlm_correct = ((predictions.reshape(-1) == ids.long().reshape(-1)).float() * w).sum()

        nsp_label = nsp_label.long().reshape(-1)
        nsp_token_loss = F.cross_entropy(nsp_logits.float(), nsp_label, reduction="none")  # (B,)
        nsp_loss = nsp_token_loss.mean()
        nsp_correct = (nsp_logits.argmax(-1) == nsp_label).float().sum()
        nsp_count = torch.tensor(float(nsp_label.numel()), device=nsp_logits.device)
        return PreTrainingLossOutput(
            loss=mlm_loss + nsp_loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss,
            mlm_acc=(mlm_correct / mlm_count.clamp(min=1.0)).detach(),
            nsp_acc=(nsp_correct / nsp_count).detach(),
            mlm_loss_sum=mlm_loss_sum.detach(), mlm_correct=mlm_correct.detach(), mlm_count=mlm_count.detach(),
            nsp_loss_sum=nsp_token_loss.sum().detach(), nsp_correct=nsp_correct.detach(), nsp_count=nsp_count,
            mlm_predictions=predictions.detach())


class BertForSequenceClassification(BertPreTrainedModel):
    """[CLS] pooled output -> dropout -> linear, as in the paper's GLUE fine-tuning (HF names)."""

    def __init__(self, config: BertConfig, num_labels: int, check_values: bool = False):
        super().__init__()
        self.config, self.check_values = config, check_values
        self.num_labels = num_labels
        self.bert = BertModel(config, check_values=check_values)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.apply(self._init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None):
        pooled = self.bert(input_ids, token_type_ids, attention_mask, unpad=True).pooler_output  # (B, H)
        logits = self.classifier(self.dropout(pooled))  # (B, num_labels)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels.long()), logits


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied tensors counted once)."""
    return sum(p.numel() for p in module.parameters())

