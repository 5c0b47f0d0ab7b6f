"""`python -m epo_jax.main` without the config validation: runs the trainer on a config that the
command line would refuse, to exercise the run-time guards a diverging run reaches with sane
settings (tests only)."""
from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)


def main(argv):
    del argv
    from epo_jax.train import trainer
    trainer.train_and_evaluate(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
