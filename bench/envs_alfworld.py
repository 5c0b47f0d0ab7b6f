"""ALFWorld steps/s: AlfWorldEnv in the process pool vs ALFWorld's own AlfredTWEnv batch env.

Both sides run the same TextWorld PddlEnv + AlfredDemangler/AlfredInfos stack, one engine per
process: ours behind epo_jax's EnvPool (process backend), the reference behind TextWorld's
asynchronous gym batch env that `AlfredTWEnv.init_env` builds. Both play the same games
(the first N train games) with the same deterministic policy (an admissible command picked
by the turn number), so every game follows the same trajectory on both sides. Only steps are
timed (not process start-up, game loading or resets); steps/s counts environment steps summed
over the batch, best of several rounds with the two sides interleaved.

    python bench/envs_alfworld.py [--envs 1 4 8] [--steps 10] [--rounds 3] [--data-dir DIR]

`alfworld_rows(n_envs_list)` returns the rows for bench/envs.py's table.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from pathlib import Path

import epo_jax.envs
from epo_jax.envs import alfworld_games
from epo_jax.envs.alfworld import episodes, resolve_data_dir

import alfworld.info as alfworld_info  # noqa: E402  (after epo_jax sets ALFWORLD_DATA)
from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv  # noqa: E402


def policy(admissible: list[str], turn: int) -> str:
    """A fixed, state-dependent choice among the admissible commands."""
    commands = sorted(admissible)
    return commands[(7 * turn + 3) % len(commands)]


def _ours_round(pool, specs, steps: int) -> tuple[int, float]:
    """(environment steps, seconds) of one timed round in the pool, after an untimed reset."""
    admissible = {i: r.info["admissible_actions"] for i, r in enumerate(pool.reset(specs))}
    count = 0
    start = time.perf_counter()
    for turn in range(steps):
        actions = {int(i): policy(admissible[int(i)], turn) for i in pool.active.nonzero()[0]}
        if not actions:
            break
        for index, result in pool.step(actions).items():
            admissible[index] = result.info["admissible_actions"]
        count += len(actions)
    return count, time.perf_counter() - start


def _reference_config(games_root: Path) -> dict:
    """The AlfredTWEnv config sections it reads, with no expert (plain stepping)."""
    return {
        "dataset": {"data_path": str(games_root / "train"),
                    "eval_id_data_path": str(games_root / "valid_seen"),
                    "eval_ood_data_path": str(games_root / "valid_unseen"),
                    "num_train_games": -1, "num_eval_games": -1},
        "logic": {"domain": alfworld_info.ALFRED_PDDL_PATH,
                  "grammar": alfworld_info.ALFRED_TWL2_PATH},
        "env": {"type": "AlfredTWEnv", "goal_desc_human_anns_prob": 0.0,
                "task_types": [1, 2, 3, 4, 5, 6], "domain_randomization": False,
                "expert_type": "handcoded"},
        "general": {"training_method": "dqn"},
        "rl": {"training": {"max_nb_steps_per_episode": 1000}},
    }


def _reference_batch(data_dir: Path, specs):
    """ALFWorld's own batch env (AlfredTWEnv.init_env) over exactly the games in `specs`."""
    games_root = data_dir / alfworld_games.GAMES_DIRNAME
    with contextlib.redirect_stdout(io.StringIO()):   # its progress bars and counts
        alfred = AlfredTWEnv(_reference_config(games_root), train_eval="train")
    alfred.game_files = [str(games_root / spec.task / "game.tw-pddl") for spec in specs]
    alfred.num_games = len(alfred.game_files)
    return alfred.init_env(batch_size=len(specs))


def _reference_round(batch, steps: int) -> tuple[int, float]:
    """(environment steps, seconds) of one timed round of the batch env, after its reset."""
    _, infos = batch.reset()
    admissible, dones = infos["admissible_commands"], [False] * len(infos["won"])
    count = 0
    start = time.perf_counter()
    for turn in range(steps):
        if all(dones):
            break
        # Finished games are skipped by the batch env; their command is ignored.
        commands = [policy(a, turn) for a in admissible]
        count += dones.count(False)
        _, _, dones, infos = batch.step(commands)
        admissible, dones = infos["admissible_commands"], list(dones)
    return count, time.perf_counter() - start


def measure(data_dir: Path, num_envs: int, steps: int, rounds: int) -> tuple[float, float]:
    """Best steps/s over `rounds` rounds of (ours, AlfredTWEnv), the two sides interleaved.

    Both sides stay up for all rounds, so each round times steps only; interleaving and
    keeping the best round damp the drift of a shared machine's load.
    """
    specs = episodes("train", data_dir=data_dir)[:num_envs]
    ours, reference = [], []
    batch = _reference_batch(data_dir, specs)
    try:
        with epo_jax.envs.make_pool("alfworld", num_envs, backend="process",
                                    max_turns=steps + 1, data_dir=str(data_dir),
                                    admissible=True) as pool:
            for _ in range(rounds):
                ours.append(_ours_round(pool, specs, steps))
                reference.append(_reference_round(batch, steps))
    finally:
        batch.close()
    if [count for count, _ in ours] != [count for count, _ in reference]:
        raise RuntimeError(f"the two sides played different numbers of steps ({ours} vs "
                           f"{reference}); the games diverged")
    return (max(count / seconds for count, seconds in ours),
            max(count / seconds for count, seconds in reference))


def alfworld_rows(n_envs_list=(1, 4, 8), steps: int = 10, rounds: int = 3,
                  data_dir: str | os.PathLike | None = None) -> list[dict]:
    """One row per batch size: steps/s of ours and of AlfredTWEnv, and their ratio.

    Row keys: environment, variant, num_envs, steps_per_s, reference_steps_per_s, ratio,
    reference.
    """
    root = resolve_data_dir(data_dir)
    if len(episodes("train", data_dir=root)) < max(n_envs_list):
        raise ValueError(f"n_envs_list={list(n_envs_list)} needs at least {max(n_envs_list)} "
                         f"train games under {root}")
    rows = []
    for num_envs in n_envs_list:
        ours, reference = measure(root, num_envs, steps, rounds)
        rows.append({"environment": "alfworld", "variant": "ours", "num_envs": num_envs,
                     "steps_per_s": ours, "reference_steps_per_s": reference,
                     "ratio": ours / reference, "reference": "AlfredTWEnv (TextWorld batch)"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--steps", type=int, default=10, help="batched steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (best kept)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding json_2.1.1 (default: the generated games)")
    args = parser.parse_args()
    rows = alfworld_rows(args.envs, steps=args.steps, rounds=args.rounds,
                         data_dir=args.data_dir)
    print(f"ALFWorld, best of {args.rounds} rounds of {args.steps} batched steps, "
          f"{os.cpu_count()} CPUs")
    print(f"{'envs':>5} {'ours steps/s':>13} {'AlfredTWEnv steps/s':>20} {'ratio':>6}")
    for row in rows:
        print(f"{row['num_envs']:>5} {row['steps_per_s']:>13.1f} "
              f"{row['reference_steps_per_s']:>20.1f} {row['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
