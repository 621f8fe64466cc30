"""The custom ``transformers`` code that ``fedllm export`` ships inside a head-mode model directory.

The two modules here are copied byte for byte into the export (and registered in its ``config.json``
``auto_map``), so a consumer without fedllm loads the model with ``trust_remote_code=True``. They import
only ``torch`` and ``transformers``, never fedllm. ``fedllm predict`` compares a directory's copies with
these files (:data:`CODE_FILES`, :func:`code_hashes`) and loads such a directory with the classes below,
never with code read from the directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CONFIG_MODULE = "configuration_fedllm_head"
MODEL_MODULE = "modeling_fedllm_head"
CODE_FILES = (f"{CONFIG_MODULE}.py", f"{MODEL_MODULE}.py")
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_MODULE}.FedllmHeadConfig",
    "AutoModelForSequenceClassification": f"{MODEL_MODULE}.FedllmHeadForSequenceClassification",
}
HERE = Path(__file__).resolve().parent


def code_hashes(folder: Path = HERE) -> dict[str, str | None]:
    """SHA-256 of each code file in ``folder`` (None where it is missing): fedllm's own when no folder is given."""
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() if (folder / name).is_file() else None
        for name in CODE_FILES
    }


def register_auto_classes() -> None:
    """Make this process's ``Auto*`` classes load ``model_type = "fedllm-head"`` with fedllm's own copy of the
    code: no ``trust_remote_code``, no file of the directory executed (used by ``fedllm predict`` after it
    checked the directory's files are identical to these)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedllm.export_head.configuration_fedllm_head import FedllmHeadConfig
    from fedllm.export_head.modeling_fedllm_head import FedllmHeadForSequenceClassification

    AutoConfig.register(FedllmHeadConfig.model_type, FedllmHeadConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(FedllmHeadConfig, FedllmHeadForSequenceClassification, exist_ok=True)
