"""The offline ALFWorld game generator: format, coverage, determinism, seen/unseen layouts.

Checks read the written files back independently (JSON, regexes over the PDDL text) and
compare them with ALFWorld's own shipped domain, grammar and goal templates; one test has
ALFWorld's own AlfredTWEnv collect and play the games.
"""
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest

from epo_jax.envs import alfworld_games

import alfworld.gen.goal_library as alfred_goals  # noqa: E402  (after ALFWORLD_DATA is set)
import alfworld.info as alfworld_info  # noqa: E402

SIX_TASK_TYPES = {
    "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place",
}
# ALFRED ids as ALFWorld mangles them: Class|+x.xx|+y.yy|+z.zz[|BasinClass].
COORD = r"_bar__(?:plus|minus)_\d\d_dot_\d\d"
OBJECT_ID = re.compile(rf"^[A-Z][A-Za-z]*(?:{COORD}){{3}}(?:_bar_[A-Z][A-Za-z]*Basin)?$")
LOCATION_ID = re.compile(r"^loc(?:_bar_(?:_minus_)?\d+){4}$")
TRIAL = re.compile(r"^trial_T\d{8}_\d{6}_\d{6}$")


def _games(root: Path, split_dir: str) -> list[Path]:
    return sorted((root / "json_2.1.1" / split_dir).glob("*/*/"))


def _declared(problem: str) -> tuple[list[str], list[str], list[str]]:
    """The object, receptacle and location names a PDDL problem declares."""
    declared = re.search(r"\(:objects agent1 - agent\s+(.*?) - object\s+(.*?) - receptacle"
                         r"\s+(.*?) - location", problem, re.S)
    return tuple(declared.group(i).split() for i in (1, 2, 3))


@pytest.fixture(scope="module")
def default_set(tmp_path_factory) -> Path:
    """The default-size set (300 train / 48 IID / 48 OOD games), written once."""
    return alfworld_games.generate(tmp_path_factory.mktemp("alfworld_default"), seed=0)


def test_default_set_has_requested_counts_and_all_six_task_types(default_set):
    for split_dir, count in alfworld_games.DEFAULT_COUNTS.items():
        games = _games(default_set, split_dir)
        assert len(games) == count
        types = [json.loads((g / "traj_data.json").read_text())["task_type"] for g in games]
        assert set(types) == SIX_TASK_TYPES, split_dir
        # Task types cycle, so no type falls below an even share.
        assert min(types.count(t) for t in SIX_TASK_TYPES) == count // 6


def test_game_files_are_alfworld_format(default_set):
    domain = Path(alfworld_info.ALFRED_PDDL_PATH).read_text()
    grammar = Path(alfworld_info.ALFRED_TWL2_PATH).read_text()
    for game_dir in _games(default_set, "valid_unseen"):
        game = json.loads((game_dir / "game.tw-pddl").read_text())
        traj = json.loads((game_dir / "traj_data.json").read_text())
        assert set(game) == {"pddl_domain", "grammar", "pddl_problem", "solvable"}
        assert game["solvable"] is True
        assert game["pddl_domain"] == domain
        # The grammar is ALFWorld's with only the goal placeholder filled, by one of ALFWorld's
        # own templates for this task type.
        params = traj["pddl_params"]
        names = {"obj": params["object_target"].lower(), "recep": params["parent_target"].lower(),
                 "toggle": params["toggle_target"].lower(), "mrecep": ""}
        templates = alfred_goals.gdict[traj["task_type"]]["templates"]
        descriptions = [template.format(**names) for template in templates]
        assert any(game["grammar"] == grammar.replace("UNKNOWN GOAL", d) for d in descriptions)
        assert traj["turk_annotations"]["anns"][0]["task_desc"]
        assert game["pddl_problem"].startswith("(define (problem plan_trial)")
        assert "(:domain alfred)" in game["pddl_problem"]


def test_names_follow_alfred_patterns(default_set):
    for split_dir in alfworld_games.SPLIT_DIRS:
        for game_dir in _games(default_set, split_dir):
            traj = json.loads((game_dir / "traj_data.json").read_text())
            params = traj["pddl_params"]
            second = params["toggle_target"] or params["parent_target"]
            assert game_dir.parent.name == (f"{traj['task_type']}-{params['object_target']}-None-"
                                            f"{second}-{traj['scene']['scene_num']}")
            assert TRIAL.match(game_dir.name)
            problem = json.loads((game_dir / "game.tw-pddl").read_text())["pddl_problem"]
            objects, receptacles, locations = _declared(problem)
            assert all(OBJECT_ID.match(name) for name in objects + receptacles), game_dir
            assert all(LOCATION_ID.match(name) for name in locations), game_dir


def test_unseen_layouts_never_appear_in_train_and_iid_reuses_train_layouts(default_set):
    plans = defaultdict(set)            # split -> floor plans used
    layout_of_plan = {}                 # (floor plan) -> receptacle ids, from train games
    for split_dir in alfworld_games.SPLIT_DIRS:
        for game_dir in _games(default_set, split_dir):
            plan = json.loads((game_dir / "traj_data.json").read_text())["scene"]["scene_num"]
            problem = json.loads((game_dir / "game.tw-pddl").read_text())["pddl_problem"]
            layout = frozenset(_declared(problem)[1])
            plans[split_dir].add(plan)
            if split_dir == "train":
                assert layout_of_plan.setdefault(plan, layout) == layout
            elif split_dir == "valid_seen" and plan in layout_of_plan:
                assert layout == layout_of_plan[plan], "an IID game moved a train layout"
            elif split_dir == "valid_unseen":
                assert layout not in layout_of_plan.values()
    assert not plans["valid_unseen"] & (plans["train"] | plans["valid_seen"])
    # Floor plans 1-6 of each scene type (1-6, 201-206, 301-306, 401-406) are the unseen ones.
    assert all(p % 100 <= 6 for p in plans["valid_unseen"])
    assert all(p % 100 > 6 for p in plans["train"] | plans["valid_seen"])
    # The splits cover every scene type.
    assert {alfworld_games.room_of(p).name for p in plans["valid_unseen"]} == set(
        alfworld_games.ROOM_TYPES)


def test_no_iid_game_repeats_a_train_game(default_set):
    def problems(split_dir):
        return {json.loads((g / "game.tw-pddl").read_text())["pddl_problem"]
                for g in _games(default_set, split_dir)}
    assert not problems("train") & problems("valid_seen")


def test_generation_is_deterministic_from_the_seed(tmp_path):
    counts = {"train": 12, "valid_seen": 6, "valid_unseen": 6}
    trees = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        root = alfworld_games.generate(tmp_path / name, seed=seed, counts=counts)
        trees.append({p.relative_to(root).as_posix(): p.read_bytes()
                      for p in sorted(root.rglob("*")) if p.is_file()})
    assert trees[0] == trees[1]
    assert trees[0] != trees[2]


def test_ensure_games_generates_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(alfworld_games.CACHE_ENV_VAR, str(tmp_path / "cache"))
    counts = {"train": 6, "valid_seen": 6, "valid_unseen": 6}
    root = alfworld_games.ensure_games(counts=counts)
    assert root.parent == tmp_path / "cache"
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert len(written) == 2 * 18 + 1      # two files per game, plus the manifest
    assert alfworld_games.ensure_games(counts=counts) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_command_line_writes_the_requested_counts(tmp_path, capsys):
    alfworld_games.main(["--out", str(tmp_path), "--seed", "1", "--train", "7",
                         "--valid-seen", "2", "--valid-unseen", "3"])
    assert [len(_games(tmp_path, s)) for s in alfworld_games.SPLIT_DIRS] == [7, 2, 3]
    assert "12 games" in capsys.readouterr().out


@pytest.mark.parametrize("counts, message", [
    ({"test": 3}, "split 'test'"),
    ({"train": -1}, r"counts\['train'\]=-1"),
])
def test_bad_counts_are_rejected(tmp_path, counts, message):
    with pytest.raises(ValueError, match=message):
        alfworld_games.generate(tmp_path, counts=counts)


def test_room_of_rejects_unknown_floor_plans():
    assert alfworld_games.room_of(12).name == "Kitchen"
    assert alfworld_games.room_of(424).name == "Bathroom"
    with pytest.raises(ValueError, match="plan_number=150"):
        alfworld_games.room_of(150)


@pytest.mark.slow
def test_alfworlds_own_batch_env_collects_and_plays_the_games(default_set):
    """ALFWorld's AlfredTWEnv (the path users with official data take) loads the games."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    games = default_set / "json_2.1.1"
    config = {
        "dataset": {"data_path": str(games / "train"),
                    "eval_id_data_path": str(games / "valid_seen"),
                    "eval_ood_data_path": str(games / "valid_unseen"),
                    "num_train_games": -1, "num_eval_games": -1},
        "logic": {"domain": alfworld_info.ALFRED_PDDL_PATH,
                  "grammar": alfworld_info.ALFRED_TWL2_PATH},
        "env": {"type": "AlfredTWEnv", "goal_desc_human_anns_prob": 0.0,
                "task_types": [1, 2, 3, 4, 5, 6], "domain_randomization": False,
                "expert_type": "handcoded"},
        "general": {"training_method": "dqn"},
        "rl": {"training": {"max_nb_steps_per_episode": 50}},
    }
    for train_eval, split_dir in (("train", "train"), ("eval_in_distribution", "valid_seen"),
                                  ("eval_out_of_distribution", "valid_unseen")):
        assert AlfredTWEnv(config, train_eval=train_eval).num_games == \
            alfworld_games.DEFAULT_COUNTS[split_dir]
    batch = AlfredTWEnv(config, train_eval="eval_out_of_distribution").init_env(batch_size=2)
    try:
        observations, infos = batch.reset()
        assert all(o.startswith("-= Welcome to TextWorld, ALFRED! =-") for o in observations)
        assert all("Your task is to: " in o for o in observations)
        commands = [sorted(c for c in admissible if c.startswith("go to "))[0]
                    for admissible in infos["admissible_commands"]]
        observations, _, dones, infos = batch.step(commands)
        for command, observation in zip(commands, observations):
            assert observation.startswith(f"You arrive at {command[len('go to '):]}.")
        assert not any(dones) and not any(infos["won"])
    finally:
        batch.close()
