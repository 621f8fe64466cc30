"""Package list for setuptools: every ``fedllm*`` package plus ``fedllm.scenarios``.

``fedllm.scenarios`` has no folder of its own: pyproject.toml maps it to the top-level ``simulations/``
(where scenarios live in the repository) so they install as package data. ``[tool.setuptools.packages.find]``
only finds folders, and an explicit list in pyproject.toml would have to name every subpackage by hand.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fedllm", "fedllm.*"]), "fedllm.scenarios"])
