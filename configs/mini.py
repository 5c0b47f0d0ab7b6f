"""A miniature EPO study on the toy key-and-door corridor, sized for a 2-core CPU.

    python bench/reproduce_mini.py                   # the whole sweep, results in docs/results.md
    python bench/reproduce_mini.py --quick           # a smoke run of the same pipeline

bench/reproduce_mini.py builds the policy this config points at (a tiny Llama-architecture
transformer with a word-level tokenizer, warm-started to follow the reply format) and starts
one `python -m epo_jax.main --config=configs/mini.py` per method and seed, with the method's
overrides (`--config.algo.advantage=grpo`, `--config.algo.entropy_control=epo`, ...).

Everything EPO-specific keeps the paper's defaults (configs/base.py: lambda = 0.001,
kappa = (0, 2), gamma = 3, alpha = 0.05, KL 0.01, clip 0.2, 1 PPO epoch); what differs is the
scale: a ~0.1M-parameter model (hence a larger learning rate), 6 groups x 4 environments,
20 turns, 8-token replies and prompts of at most 55 tokens. The official code's turn gate (25 of 30
turns) and weight-curve length (150 epochs) are scaled to 20 turns and `train.total_steps`.

`:quick` is a few-step smoke configuration of the same pipeline.
"""
import pathlib
import runpy

# Loaded by path so the config works from any working directory (configs/ is no package).
_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))


def get_config(arg: str = ""):
    if arg not in ("", "quick"):
        raise ValueError(f"configs/mini.py takes '' or 'quick' after the colon, got {arg!r}")
    c = _base["get_config"]()
    c.workdir = "runs/mini/default"
    # Written by bench/reproduce_mini.py (pass --config.model.path to use another folder).
    c.model.path = "runs/mini/policy"

    c.env.name = "toy_keydoor"
    c.env.num_groups = 6
    c.env.group_size = 4
    c.env.max_turns = 20
    c.env.history_length = 0           # the observation holds the whole state
    c.env.show_actions = False         # the commands are part of the warm start, not the prompt
    c.env.step_timeout_s = 30.0

    c.rollout.max_prompt_len = 56      # the longest prompt of the corridor is 55 tokens
    c.rollout.prompt_buckets = (56,)
    c.rollout.max_response_len = 8     # "<think> </think> <action> go east </action>" is 6 tokens

    # 24 episodes x 20 turns = 480 turn samples at most: 2 minibatches (2 optimizer steps per RL
    # step) of 4 micro-batches of 60 rows, so that a step's batch is rarely padded much.
    c.algo.micro_batch_size = 60
    c.algo.num_minibatches = 2
    c.algo.entropy_coef = 0.001        # the entropy-bonus baseline, at EPO's lambda

    c.epo.code_turn_gate = 17          # 25 / 30 of the turn limit, as in the official code
    c.train.total_steps = 40
    c.epo.code_total_epochs = c.train.total_steps

    c.optim.lr = 1e-3
    c.optim.critic_lr = 1e-3

    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 1
    c.eval.every_steps = 10
    c.eval.num_episodes = 24           # one wave of the 24 environments per split
    c.logging.tensorboard = False

    if arg == "quick":
        c.env.num_groups = 2
        c.env.group_size = 2
        c.env.max_turns = 6
        c.train.total_steps = 3
        c.epo.code_total_epochs = 3
        c.epo.code_turn_gate = 5
        c.algo.micro_batch_size = 8
        c.checkpoint.every_steps = 3
        c.eval.every_steps = 3
        c.eval.num_episodes = 4
    return c
