"""A fedllm head-mode classifier: a frozen encoder, mean-pooled over the attention mask, L2-normalised, then
a linear head (or one hidden ReLU layer). Written by ``fedllm export``; the same computation as fedllm's
``features.py`` followed by its ``FeatureHead``. Only torch and transformers are imported."""

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_fedllm_head import FedllmHeadConfig


class FedllmHeadForSequenceClassification(PreTrainedModel):
    config_class = FedllmHeadConfig
    base_model_prefix = "encoder"

    def __init__(self, config):
        super().__init__(config)
        if config.pooling != "mean-mask-l2-v2":
            raise ValueError(f"unknown pooling {config.pooling!r}; this code computes 'mean-mask-l2-v2' only")
        self.encoder = AutoModel.from_config(AutoConfig.for_model(**config.feature_encoder))
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # the features are a mean over tokens; the [CLS] pooler is never used
        dim, width, n = self.encoder.config.hidden_size, config.head_hidden, config.num_labels
        if width > 0:
            self.head = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, n))
        else:
            self.head = nn.Linear(dim, n)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # As in training: the encoder builds its own position and token-type ids (its family's convention).
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.head(nn.functional.normalize(pooled, dim=-1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
