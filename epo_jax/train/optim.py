"""AdamW with linear warmup and cosine decay to a floor, as EPO's runs use (paper App. B)."""
from __future__ import annotations

import jax
import ml_collections
import optax


def lr_schedule(peak_lr: float, total_updates: int, warmup_ratio: float,
                min_lr_ratio: float) -> optax.Schedule:
    """lr(u) = peak * u / W for u < W, then min + (peak - min) * (1 + cos(pi * p)) / 2 with
    p = (u - W) / (N - W) and min = min_lr_ratio * peak; W = floor(warmup_ratio * N)."""
    warmup = int(warmup_ratio * total_updates)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_updates, warmup + 1), end_value=min_lr_ratio * peak_lr)


def _adamw(optim: ml_collections.ConfigDict, peak_lr: float, total_updates: int):
    schedule = lr_schedule(peak_lr, total_updates, optim.warmup_ratio, optim.min_lr_ratio)
    return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_updates: int) -> optax.GradientTransformation:
    """Gradient clipping by global norm (policy and critic together), then AdamW on the schedule
    above: `optim.lr` for the policy, `optim.critic_lr` for the top-level params entries
    "value_head" and "critic" (see epo_jax.train.actor_critic)."""
    def labels(params):
        return {name: jax.tree.map(lambda _: "critic" if name in ("value_head", "critic") else "policy",
                                   subtree) for name, subtree in params.items()}

    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.multi_transform({"policy": _adamw(optim, optim.lr, total_updates),
                               "critic": _adamw(optim, optim.critic_lr, total_updates)}, labels))


def optimizer_steps_per_rl_step(config: ml_collections.ConfigDict) -> int:
    """Optimizer steps of one RL step's update: algo.ppo_epochs x algo.num_minibatches."""
    return int(config.algo.ppo_epochs) * int(config.algo.num_minibatches)


def make_run_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`make_optimizer` for a run: its schedule spans every optimizer step of train.total_steps RL steps."""
    return make_optimizer(config.optim, int(config.train.total_steps) * optimizer_steps_per_rl_step(config))
