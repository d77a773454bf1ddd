"""Offline by construction: no code path of ours may reach a model or data-set hub."""

import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def go_offline() -> None:
    """Set the hub libraries' offline switches unless the user set them (call before importing transformers)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
