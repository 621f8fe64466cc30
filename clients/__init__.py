"""Flower ClientApp of fedllm and institution profiles."""
