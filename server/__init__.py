"""Flower ServerApp of fedllm."""
