"""Every algo.entropy_control through the real jitted update on the tiny model: a finite loss,
changed parameters, and the method's own metrics live (one compile per method)."""
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_update import mesh_of, random_batch, run_update, tiny_config  # noqa: E402

from epo_jax.algo import ENTROPY_CONTROLS  # noqa: E402

# Settings that make each method act on the tiny batch (8 rows x 5 tokens = 40 tokens): with the
# paper's Clip-Cov ratio of 2e-4 and bounds (1, 5) it would usually select nothing here.
METHOD_SETTINGS = {
    "bonus": {"entropy_coef": 0.01},
    "clip_cov": {"clip_cov_ratio": 0.1, "clip_cov_lb": -100.0},
    "kl_cov": {"kl_cov_ratio": 0.1},
}
# A metric that must be non-zero when the method is on.
LIVE_METRIC = {
    "bonus": "entropy_loss",
    "epo": "entropy_loss",
    "aepo": "aepo_adv_scale_max",
    "clip_cov": "cov_selected_fraction",
    "kl_cov": "kl_cov_penalty",
    "top_entropy": "top_entropy_kept_fraction",
}


@pytest.mark.parametrize("control", ENTROPY_CONTROLS)
def test_one_update_per_entropy_control(control):
    config = tiny_config(micro_batch_size=4, entropy_control=control, **METHOD_SETTINGS.get(control, {}))
    new, metrics, before = run_update(config, random_batch(8, seed=3), mesh_of(1, 1, jax.devices()[:1]))
    assert np.isfinite(metrics["loss"]) and metrics["skipped"] == 0.0
    change = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(before)))
    assert change > 1e-4
    if control in LIVE_METRIC:
        assert metrics[LIVE_METRIC[control]] != 0.0
