"""Tests of epo_jax.algo."""
