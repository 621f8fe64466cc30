"""Configuration of a fedllm head-mode classifier (written by ``fedllm export``; the model is in
modeling_fedllm_head.py). Only torch and transformers are imported, so no fedllm is needed to load it."""

from transformers import PretrainedConfig


class FedllmHeadConfig(PretrainedConfig):
    """``feature_encoder``: the frozen encoder's own config (a dict with its ``model_type``);
    ``head_hidden``: 0 for a linear head, else the width of its one hidden ReLU layer;
    ``pooling``: the feature recipe the head was trained on (only "mean-mask-l2-v2" exists)."""

    model_type = "fedllm-head"

    def __init__(self, feature_encoder=None, head_hidden=0, pooling="mean-mask-l2-v2", **kwargs):
        self.feature_encoder = dict(feature_encoder or {})
        self.head_hidden = int(head_hidden)
        self.pooling = pooling
        super().__init__(**kwargs)
