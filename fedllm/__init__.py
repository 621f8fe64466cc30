"""fedllm: federated DP fine-tuning of BERT-family classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One source: pyproject.toml's [project] version, which Flower also stamps on the app bundle; a node
    # compares a run's bundle version with this (fedllm.node.TrustPolicy).
    __version__ = version("fedllm")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
