"""Runs an epo-jax training job.

    python -m epo_jax.main --config=configs/scienceworld.py [--config.epo.lam=0.002 ...]

The config file's `get_config()` gives every knob (configs/base.py lists them); any field is
overridable as `--config.a.b=value`. The config is validated before anything starts, so a bad
value fails at once with the field's name. Restarting the same command resumes the run from
the latest checkpoint in `config.workdir`.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from epo_jax.config import validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file, e.g. configs/scienceworld.py or configs/scienceworld.py:paper.",
    lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}; set fields as --config.a.b=value.")
    config = validate(_CONFIG.value)
    if not flags.FLAGS["verbosity"].present:
        # The run prints its own progress line per step; library INFO chatter (orbax logs every
        # checkpoint file) stays off unless asked for with --verbosity=0.
        logging.set_verbosity(logging.WARNING)

    import jax  # After flag parsing, so that XLA flags and the platform are settled first.
    if config.distributed.initialize:
        # Multi-host (TPU pod / GPU cluster): every process runs this same command.
        kwargs = {}
        if config.distributed.coordinator_address:
            kwargs = dict(coordinator_address=config.distributed.coordinator_address,
                          num_processes=config.distributed.num_processes,
                          process_id=config.distributed.process_id)
        if jax.config.jax_platforms == "cpu" or config.distributed.get("cpu_collectives", False):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())

    from epo_jax.train import trainer
    trainer.train_and_evaluate(config)


if __name__ == "__main__":
    app.run(main)
