"""EPO on ScienceWorld.

    python -m epo_jax.main --config=configs/scienceworld.py              # CPU-sized default run
    python -m epo_jax.main --config=configs/scienceworld.py:paper        # the paper's sizes
    python -m epo_jax.main --config=configs/scienceworld.py:reference    # what the released scripts ran

The default runs on a laptop CPU with the embedded SmolLM2-135M-Instruct; `:paper` selects
EPO's ScienceWorld setting (Qwen2.5-7B-Instruct in the paper: pass
`--config.model.path=/path/to/Qwen2.5-7B-Instruct`).
"""
import pathlib
import runpy

# Loaded by path so the config works from any working directory (configs/ is no package).
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config(arg: str = ""):
    c = _base["get_config"]()
    c.workdir = "runs/scienceworld"
    c.env.name = "scienceworld"
    c.env.max_turns = 30
    c.env.simplification = "easy"
    c.epo.alpha = 0.05
    c.train.total_steps = 125
    c.optim.lr = 3e-6
    # The README's ScienceWorld PPO + EPO command (Qwen2.5-7B-Instruct): seed 0, lr 3e-6,
    # ppo_mini_batch_size 64, ppo_micro_batch_size_per_gpu 8.
    return _base["preset"](c, arg, config_file="scienceworld.py", cpu_max_turns=4,
                           reference=dict(seed=0, lr=3e-6, ppo_mini_batch_size=64,
                                          ppo_micro_batch_size_per_gpu=8))
