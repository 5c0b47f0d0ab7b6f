"""Loads the run config of configs/base.py for the algorithm tests."""
import importlib.util
import pathlib

import ml_collections

_BASE_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "base.py"


def load_base_config() -> ml_collections.ConfigDict:
    """A fresh copy of the default run config, safe to modify."""
    spec = importlib.util.spec_from_file_location("epo_base_config", _BASE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
