"""The Flower apps that ``[tool.flwr.app.components]`` names: one ServerApp, one ClientApp.

They live inside the ``fedllm`` package so that an installed fedllm (wheel or editable) carries them under
its own name; the top-level ``server/`` and ``clients/`` folders hold only each side's files (deployment
files, node profiles), never importable code.
"""
