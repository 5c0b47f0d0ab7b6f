"""Errors a user can fix, as opposed to bugs.

`python -m epo_jax.main` (and the other entry points) print these as one line saying what is
wrong, where, and how to fix it, and exit with status 2; `--verbose` shows the traceback too.
"""


class UserError(Exception):
    """A bad input (config field, model folder, checkpoint): the message is the whole story."""


class ConfigError(UserError, ValueError):
    """A config field is missing, unknown, of the wrong type, or outside its allowed range."""


class ModelLoadError(UserError, ValueError):
    """A model folder or file that cannot be loaded: damaged, incomplete or not finite."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model folder, file or package that is not where the config says."""
