"""fedllm: federated DP fine-tuning of BERT-family classifiers."""

__version__ = "0.1.0"
