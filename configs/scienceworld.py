"""EPO on ScienceWorld.

    python -m epo_jax.main --config=configs/scienceworld.py          # CPU-sized default run
    python -m epo_jax.main --config=configs/scienceworld.py:paper    # the paper's sizes

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
    if arg == "paper":
        return c
    if arg:
        raise ValueError(f"configs/scienceworld.py takes '' or 'paper' after the colon, got {arg!r}")
    # CPU-sized default: the same code paths at a scale whose first steps finish in minutes.
    c.env.num_groups = 1
    c.env.group_size = 2
    c.env.max_turns = 4
    c.rollout.max_prompt_len = 1024
    c.rollout.max_response_len = 64
    # The update pads every row to the bucket of the step's longest prompt; later turns' prompts
    # (500-700 tokens) fit 768, which costs 40% less than padding them to 1024.
    c.rollout.prompt_buckets = (512, 768, 1024)
    c.train.total_steps = 20
    c.optim.lr = 1e-5
    # 2 rows per micro-batch, each decoder layer rematerialised in the backward pass: a SmolLM2
    # micro-batch of 4 x 1088 tokens without remat holds 10-20 GB of activations on a CPU.
    c.algo.micro_batch_size = 2
    c.model.remat = True
    c.checkpoint.every_steps = 2
    c.eval.every_steps = 10
    c.eval.num_episodes = 2
    return c
