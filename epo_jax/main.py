"""Runs an epo-jax training job.

    python -m epo_jax.main --config=configs/scienceworld.py [--config.epo.lam=0.002 ...]

The config file's `get_config()` gives every knob (configs/base.py lists them); any field is
overridable as `--config.a.b=value`. The config is validated before anything starts, so a bad
value fails at once with the field's name. Restarting the same command resumes the run from
the latest checkpoint in `config.workdir`.

A bad input (a config field, a model folder, a checkpoint) ends the run with one line saying
what is wrong and how to fix it, and exit status 2; `--verbose` adds the traceback.
"""
from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from epo_jax import config as config_lib
from epo_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file, e.g. configs/scienceworld.py or configs/scienceworld.py:paper.",
    lock_config=True)
flags.mark_flags_as_required(["config"])
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an error, not just its one-line message.")

EXIT_USER_ERROR = 2


def exit_with(error: BaseException, verbose: bool) -> None:
    """Prints a user error as one line (and the traceback when verbose) and exits with status 2."""
    if verbose:
        import traceback
        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _verbose_requested(argv: list[str]) -> bool:
    return any(arg in ("--verbose", "--verbose=true", "--verbose=True") for arg in argv)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config overrides checked first: an unknown field is named with
    the nearest existing ones, a value of the wrong type names the field and the type wanted."""
    try:
        config_lib.check_command_line(argv)
        return flags.FLAGS(argv)
    except UserError as error:
        exit_with(error, _verbose_requested(argv))
    except flags.Error as error:
        exit_with(config_lib.flag_error(error), _verbose_requested(argv))


def _initialize_distributed(config) -> None:
    """Multi-host (TPU pod / GPU cluster): every process runs this same command."""
    import jax
    kwargs = {}
    if config.distributed.coordinator_address:
        kwargs = dict(coordinator_address=config.distributed.coordinator_address,
                      num_processes=config.distributed.num_processes,
                      process_id=config.distributed.process_id)
    # Collectives between processes' CPU devices (a run on CPU hosts; harmless beside accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}; set fields as --config.a.b=value.")
    try:
        config = config_lib.validate(_CONFIG.value)
        if not flags.FLAGS["verbosity"].present:
            # The run prints its own progress line per step; library INFO chatter (orbax logs every
            # checkpoint file) stays off unless asked for with --verbosity=0.
            logging.set_verbosity(logging.WARNING)
        import jax  # After flag parsing, so that XLA flags and the platform are settled first.
        if config.distributed.initialize:
            _initialize_distributed(config)
        logging.info("process %d/%d, %d local / %d global devices", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count())

        from epo_jax import sft
        from epo_jax.train import trainer
        config = sft.with_cold_start(config)  # sft.cold_start: make or reuse it, then start RL from it
        trainer.train_and_evaluate(config)
    except UserError as error:
        exit_with(error, _VERBOSE.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
