"""BERT model: HF-compatible names and weights, single-device code."""

from bert.model import (BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel,
                        PRESETS, count_parameters)

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForSequenceClassification", "PRESETS",
           "count_parameters"]
