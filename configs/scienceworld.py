"""EPO on ScienceWorld.

    python -m epo_jax.main --config=configs/scienceworld.py              # CPU-sized default run
    python -m epo_jax.main --config=configs/scienceworld.py:paper        # the paper's sizes
    python -m epo_jax.main --config=configs/scienceworld.py:reference    # what the released scripts ran

The default runs on a laptop CPU with the embedded SmolLM2-135M-Instruct, from a supervised cold
start on ScienceWorld's gold paths that the first run makes (about 20 minutes) and later runs
reuse; `:paper` selects EPO's ScienceWorld setting (Qwen2.5-7B-Instruct in the paper: pass
`--config.model.path=/path/to/Qwen2.5-7B-Instruct`), without a cold start.
"""
import pathlib
import runpy

import ml_collections

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
    return _base["preset"](c, arg, config_file="scienceworld.py", cpu_max_turns=8,
                           reference=dict(seed=0, lr=3e-6, ppo_mini_batch_size=64,
                                          ppo_micro_batch_size_per_gpu=8),
                           cpu_settings=_cpu_default)


def _cpu_default(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    # The CPU default: the three train tasks with the shortest gold paths (1-9 actions, most 3-7,
    # so 8 turns let most of their episodes be won; the next shortest take 10 and more), learnt
    # from a supervised cold start on their gold paths, made on first use and cached (epo_jax/sft.py):
    # the embedded SmolLM2-135M never writes the reply format on its own.
    c.env.tasks = ("find-non-living-thing", "lifespan-longest-lived", "lifespan-shortest-lived")
    c.sft.cold_start = True
    # 16 expert episodes (74 turns, 20 steps of 4 turns) teach the format: the policy wrote it on
    # every IID turn after them (bench/README.md); twice as many would double the ~20 minutes.
    c.sft.episodes = 16
    c.sft.eval_episodes = 6            # two per task
    return c
