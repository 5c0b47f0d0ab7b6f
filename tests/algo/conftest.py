"""Fixtures for the algorithm tests."""
import ml_collections
import pytest

from .base_config import load_base_config


@pytest.fixture
def base_config() -> ml_collections.ConfigDict:
    """A fresh copy of the default run config (configs/base.py), safe to modify."""
    return load_base_config()
