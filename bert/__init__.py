"""BERT model: HF-compatible names and weights, single-device code."""

from bert.config import PRESETS, BertConfig
from bert.model import BertForPreTraining, BertForSequenceClassification, BertModel, count_parameters

__all__ = ["BertConfig", "BertModel", "BertForPreTraining", "BertForSequenceClassification", "PRESETS",
           "count_parameters"]
