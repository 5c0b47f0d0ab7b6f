"""Evaluation panels: the documented rule (re-implemented here from the module docstring), its
independence from listing order, process count and pool size, the published lists in
docs/panels/, and the panel the trainer evaluates."""
import collections
import hashlib
import itertools
import json
import pathlib
import random
import runpy

import pytest

from epo_jax.envs import EpisodeSpec, alfworld_games, panels
from epo_jax.envs import episodes as list_episodes
from epo_jax.envs.alfworld import episodes as alfworld_episodes

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPLITS = [("scienceworld", "iid"), ("scienceworld", "ood"), ("scienceworld", "unseen_task"),
          ("toy_keydoor", "iid"), ("toy_keydoor", "ood")]


def reference_panel(episodes, size, key, group):
    """The docstring's rule, written independently: strata in alphabetical order, each sorted by
    sha256(identity), then read column by column (round-robin), truncated to `size`."""
    strata = collections.defaultdict(list)
    for e in episodes:
        strata[group(e)].append(e)
    columns = [sorted(strata[name], key=lambda e: hashlib.sha256(key(e).encode()).hexdigest())
               for name in sorted(strata)]
    interleaved = [e for row in itertools.zip_longest(*columns) for e in row if e is not None]
    return interleaved if size == -1 else interleaved[:size]


@pytest.fixture(scope="module")
def alfworld_dir(tmp_path_factory):
    return alfworld_games.generate(tmp_path_factory.mktemp("alfworld"), seed=7,
                                   counts={"train": 2, "valid_seen": 13, "valid_unseen": 7})


@pytest.mark.parametrize("env, split", SPLITS)
@pytest.mark.parametrize("size", [1, 7, 24, 48, 96, -1])
def test_panel_follows_the_documented_rule(env, split, size):
    specs = list_episodes(env, split)
    expected = reference_panel(specs, size, key=lambda e: f"{e.task}/{e.variation}", group=lambda e: e.task)
    assert panels.panel(env, split, size) == expected


def test_alfworld_panel_groups_games_by_task_type_and_orders_them_by_game_id(alfworld_dir):
    specs = alfworld_episodes("iid", data_dir=alfworld_dir)
    for spec in specs:  # the task type parsed from the game id is the one its traj_data.json names
        traj = json.loads((alfworld_dir / "json_2.1.1" / spec.task / "traj_data.json").read_text())
        assert panels.alfworld_task_type(spec.task) == traj["task_type"]
    expected = reference_panel(specs, 8, key=lambda e: e.task, group=lambda e: e.task.split("/")[1].split("-")[0])
    chosen = panels.panel("alfworld", "iid", 8, data_dir=alfworld_dir)
    assert chosen == expected
    assert len({panels.alfworld_task_type(s.task) for s in chosen}) == 6  # every task type, then a second round
    # Another listing of the same games (a game added in front shifts every index): the same games.
    relisted = [EpisodeSpec(s.task, i + 1) for i, s in enumerate(specs)]
    assert [s.task for s in panels.select("alfworld", relisted, 8)] == [s.task for s in chosen]


@pytest.mark.parametrize("env, split", SPLITS[:2] + SPLITS[3:])
def test_panel_is_stratified_over_tasks(env, split):
    specs = list_episodes(env, split)
    available = collections.Counter(s.task for s in specs)
    for size in (24, 48, 96):
        counts = collections.Counter(s.task for s in panels.panel(env, split, size))
        assert sum(counts.values()) == min(size, len(specs))
        # Every task is drawn from (given room); two tasks' counts differ by more than one only where the
        # smaller one has no episodes left.
        assert set(counts) == set(available) or size < len(available)
        for t, u in itertools.permutations(available, 2):
            assert counts[t] >= counts[u] - 1 or counts[t] == available[t], (t, u, counts)


@pytest.mark.parametrize("env, split", SPLITS)
def test_panel_ignores_listing_order_and_larger_panels_extend_smaller_ones(env, split):
    specs = list_episodes(env, split)
    shuffled = random.Random(3).sample(specs, len(specs))
    assert panels.select(env, shuffled, 48) == panels.select(env, specs, 48)
    big = panels.panel(env, split, 96)
    for size in (1, 5, 24, 48):
        assert panels.panel(env, split, size) == big[:size]
    whole = panels.panel(env, split, -1)
    assert sorted(whole) == sorted(specs) and panels.panel(env, split, 10 ** 6) == whole
    assert panels.panel(env, "dev" if split == "iid" else split, 24) == panels.panel(env, split, 24)


def test_panel_size_must_be_a_count():
    for bad in (-2, 2.5, True, "48"):
        with pytest.raises(ValueError, match="eval.num_episodes"):
            panels.select("toy_keydoor", list_episodes("toy_keydoor", "iid"), bad)


@pytest.mark.parametrize("size", [1, 7, 24, 48])
def test_processes_and_waves_play_the_panel_exactly_once(size):
    """What evaluate() plays: each process's share in waves of the pool's size; together, for any
    process count and pool size, every panel episode once."""
    panel = panels.panel("scienceworld", "ood", size)
    for num_processes in (1, 2, 3, 4):
        shares = [panels.process_share(panel, p, num_processes) for p in range(num_processes)]
        for pool_size in (1, 2, 5, 8, 24, 100):
            played = []
            for share in shares:
                waves = list(panels.waves(share, pool_size))
                assert all(1 <= len(w) <= pool_size for w in waves)
                assert len(waves) == -(-len(share) // pool_size)
                played += [s for w in waves for s in w]
            assert sorted(played) == sorted(panel)
    with pytest.raises(ValueError):
        panels.process_share(panel, 2, 2)


def test_trainer_evaluates_the_same_panel_whatever_the_seed_and_sizes():
    from epo_jax.train import evaluation

    base = runpy.run_path(str(ROOT / "configs" / "mini.py"))["get_config"]()
    chosen = []
    for seed, groups, group_size in ((0, 6, 4), (7, 2, 2), (3, 12, 8)):
        config = base.copy_and_resolve_references()
        config.seed, config.env.num_groups, config.env.group_size = seed, groups, group_size
        chosen.append(evaluation.eval_panels(config))
    assert chosen[0] == chosen[1] == chosen[2]
    assert chosen[0]["iid"] == panels.panel("toy_keydoor", "iid", base.eval.num_episodes)


@pytest.mark.parametrize("path", sorted((ROOT / "docs" / "panels").glob("*.json")), ids=lambda p: p.name)
def test_published_panel_lists_are_what_the_rule_gives(path):
    record = json.loads(path.read_text())
    assert record["rule"] == panels.PANEL_RULE
    chosen = {split: panels.panel(record["env"], split, record["size"]) for split in record["splits"]}
    assert path.read_text() == panels.to_json(record["env"], record["size"], chosen)
    for split, specs in chosen.items():
        assert record["splits"][split]["episodes"] == [[s.task, s.variation] for s in specs]
        assert record["splits"][split]["digest"] == hashlib.sha256(
            json.dumps([[s.task, s.variation] for s in specs]).encode()).hexdigest()[:16]


def test_command_line_prints_the_panel(capsys):
    assert panels.main(["toy_keydoor", "5", "--splits", "ood"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"ood {s.task} {s.variation}" for s in panels.panel("toy_keydoor", "ood", 5)]
