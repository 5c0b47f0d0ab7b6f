"""Checkpoint fingerprints against a numpy re-implementation, the non-finite refusal, the structure
check before restore, set-aside bookkeeping and the resume config check (faults injected into a
real train state's checkpoints are in test_fault_injection.py)."""
import json
import logging
import os
import runpy
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_jax.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOD32 = 2**32


def small_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((16, 8)).astype(np.float32)),
        "half": jnp.asarray(rng.standard_normal(24).astype(np.float32)).astype(jnp.bfloat16),
        "fp16": jnp.asarray(rng.standard_normal(5).astype(np.float16)),
        "count": jnp.asarray(rng.integers(-5, 5, 7), jnp.int32),
        "flags": jnp.asarray(rng.random(9) < 0.5),
        "bytes": jnp.asarray(rng.integers(0, 255, 6), jnp.uint8),
        "rng": jax.random.key(seed),
        "step": jnp.int32(seed),
    }


def reference_sums(x, row_words: int = 1024) -> tuple[int, int]:
    """The fingerprint's rule in numpy, word by word: the leaf's bits as unsigned words of its
    width (bool as one byte; 64-bit values as two 32-bit words), widened; their sum, and their sum
    weighted by 2 floor(i / 1024) + 1, both mod 2^32 (Python integers: no overflow to mind)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    words = [int(w) for w in a.view(np.dtype(f"uint{min(a.dtype.itemsize, 4) * 8}")).ravel()]
    return (sum(words) % MOD32,
            sum((2 * (i // row_words) + 1) * w for i, w in enumerate(words)) % MOD32)


def test_fingerprint_matches_numpy_and_names_shapes_and_dtypes():
    state = {**small_state(), "long": jnp.asarray(np.random.default_rng(5).integers(-9, 9, 3000), jnp.int32)}
    fp = ckpt.fingerprint(state)
    assert fp["version"] == 2 and len(fp["leaves"]) == len(state)
    for key, leaf in state.items():
        shape, dtype, *sums = fp["leaves"][f"['{key}']"]
        assert tuple(sums) == reference_sums(leaf), key
        assert tuple(shape) == leaf.shape and dtype == str(leaf.dtype)


def test_host_and_device_checksums_agree(monkeypatch):
    """numpy takes them for arrays in host memory, a jitted pass elsewhere: one definition."""
    state = {**small_state(4), "long": jnp.asarray(np.random.default_rng(6).integers(0, 2**31, 5000), jnp.int32)}
    on_host = ckpt.fingerprint(state)
    monkeypatch.setattr(ckpt, "_in_host_memory", lambda x: False)
    assert ckpt.fingerprint(state) == on_host
    poisoned = {**state, "w": state["w"].at[1, 1].set(jnp.nan), "half": state["half"].at[0].set(jnp.inf)}
    assert ckpt.non_finite_leaves(poisoned) == {"['w']": 1, "['half']": 1}
    with jax.enable_x64(True):  # 64-bit values: two words each, the low one first, on both paths
        wide = {"f64": jnp.asarray(np.random.default_rng(8).standard_normal(1500)),
                "i64": jnp.arange(-700, 1800, dtype=jnp.int64)}
        on_device = ckpt.fingerprint(wide)
        monkeypatch.undo()
        assert ckpt.fingerprint(wide) == on_device
        assert tuple(on_device["leaves"]["['f64']"][2:]) == reference_sums(wide["f64"])


@pytest.mark.parametrize("key", ["w", "half", "fp16", "count", "bytes", "flags"])
def test_one_flipped_bit_changes_both_sums(key):
    state = small_state()
    before = ckpt.fingerprint(state)["leaves"][f"['{key}']"][2:]
    a = np.array(state[key]).reshape(-1)
    if key == "flags":  # a bool is 0 or 1: flip the value itself
        a[3] = ~a[3]
    else:
        a.view(np.uint8)[3 * a.itemsize] ^= 0x01
    flipped = ckpt.fingerprint({**state, key: jnp.asarray(a.reshape(state[key].shape))})["leaves"][f"['{key}']"][2:]
    assert flipped[0] != before[0] and flipped[1] != before[1]


def test_words_moved_to_another_row_change_the_weighted_sum():
    w = np.random.default_rng(7).standard_normal(3000).astype(np.float32)
    before = ckpt.fingerprint({"w": jnp.asarray(w)})["leaves"]["['w']"][2:]
    w[[5, 2500]] = w[[2500, 5]]
    after = ckpt.fingerprint({"w": jnp.asarray(w)})["leaves"]["['w']"][2:]
    assert after[0] == before[0] and after[1] != before[1]


def test_fingerprint_does_not_depend_on_the_sharding():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    state = small_state(3)
    sharded = {**state, "w": jax.device_put(state["w"], NamedSharding(mesh, PartitionSpec("data", "fsdp"))),
               "half": jax.device_put(state["half"], NamedSharding(mesh, PartitionSpec("data")))}
    assert len(sharded["w"].sharding.device_set) == 8
    single = ckpt.fingerprint(state)
    assert ckpt.fingerprint(sharded) == single
    with pytest.MonkeyPatch.context() as patch:  # the jitted pass over the sharded arrays
        patch.setattr(ckpt, "_in_host_memory", lambda x: False)
        assert ckpt.fingerprint(sharded) == single


def test_save_refuses_non_finite_state_and_writes_nothing(tmp_path):
    state = small_state()
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    poisoned = {**state, "w": state["w"].at[2, 3].set(jnp.nan).at[0, 0].set(jnp.inf),
                "half": state["half"].at[1].set(-jnp.inf)}
    with pytest.raises(ckpt.NonFiniteStateError, match=r"refusing to write checkpoint 4.*2 leaves.*"
                                                       r"\['half'\] \(1\).*\['w'\] \(2\)"):
        checkpointer.save(4, poisoned, {"step": 4})
    checkpointer.save(5, state, {"step": 5})
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_round_trip_keeps_values_and_meta_and_records_the_fingerprint(tmp_path):
    state = small_state(1)
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=True)
    checkpointer.save(2, state, {"step": 2, "cursor": 7})
    checkpointer.wait()
    restored, meta = checkpointer.restore(small_state(9))
    checkpointer.close()
    assert meta == {"step": 2, "cursor": 7}
    for key in state:
        if key == "rng":
            np.testing.assert_array_equal(jax.random.key_data(restored[key]), jax.random.key_data(state[key]))
        else:
            np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
    on_disk = json.loads((tmp_path / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert on_disk["fingerprint"] == ckpt.fingerprint(state)


def test_fingerprint_is_of_the_state_saved_when_the_caller_donates_it_at_once(tmp_path, monkeypatch):
    """The fingerprint is finished while orbax writes; the training loop's next update donates the
    state's buffers meanwhile. What is recorded and restored is the state as it was at save (the
    checksums are held back until the donating update has run)."""
    fulfil, donated = ckpt._fulfil, threading.Event()  # the background part of the fingerprint
    monkeypatch.setattr(ckpt, "_fulfil", lambda *args: (donated.wait(10), fulfil(*args)))
    state = {**small_state(4), "big": jnp.asarray(np.random.default_rng(4).standard_normal(2**21), jnp.float32)}
    expected_fp = ckpt.fingerprint(state)
    expected = {key: np.array(jax.random.key_data(x) if key == "rng" else x) for key, x in state.items()}
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=True)
    checkpointer.save(1, state, {"step": 1})
    overwrite = jax.jit(lambda x: x * 0 + 7, donate_argnums=0)
    state = {**state, "w": overwrite(state["w"]), "big": overwrite(state["big"])}
    donated.set()
    checkpointer.wait()
    on_disk = json.loads((tmp_path / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert on_disk["fingerprint"] == expected_fp
    restored, _ = checkpointer.restore(small_state(9) | {"big": state["big"]})  # verifies the fingerprint
    checkpointer.close()
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored[key]) if key == "rng"
                                                 else restored[key]), value)
    assert float(state["big"][0]) == 7.0


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failing_fingerprint_fails_the_save_and_leaves_no_checkpoint(tmp_path, monkeypatch, async_save):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=async_save)
    checkpointer.save(1, small_state(1), {"step": 1})
    checkpointer.wait()

    def broken(words):
        raise MemoryError("checksum pass failed")

    monkeypatch.setattr(ckpt, "_host_checksums", broken)
    with pytest.raises(MemoryError, match="checksum pass failed"):
        checkpointer.save(2, small_state(2), {"step": 2})
        checkpointer.wait()
    monkeypatch.undo()
    assert checkpointer.latest_step() == 1
    restored, meta = checkpointer.restore(small_state())
    checkpointer.close()
    assert meta == {"step": 1} and int(restored["step"]) == 1


def test_another_state_structure_is_refused_naming_leaves_and_nothing_moves(tmp_path):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, small_state(), {"step": 1})
    smaller = {**small_state(), "w": jnp.zeros((8, 8))}
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"\['w'\] is \(16, 8\) float32 there, "
                                                              r"\(8, 8\) float32 here"):
        checkpointer.restore(smaller)
    fewer = {k: v for k, v in small_state().items() if k != "count"}
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"the checkpoint has leaves this run's "
                                                              r"state lacks: \['count'\]"):
        checkpointer.restore(fewer)
    more = {**small_state(), "critic": jnp.zeros(3)}
    with pytest.raises(ckpt.IncompatibleCheckpointError, match=r"lacks: \['critic'\]"):
        checkpointer.restore(more)
    checkpointer.close()
    assert os.listdir(tmp_path / "checkpoints") == ["1"] and not (tmp_path / ckpt.REJECTED_DIR).exists()


def _garble_meta(workdir, step: int) -> None:
    (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{not json")


def test_given_step_that_fails_raises_and_stays_all_failing_move_all(tmp_path, caplog):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    for step in (1, 2):
        checkpointer.save(step, small_state(step), {"step": step})
    _garble_meta(tmp_path, 2)
    with pytest.raises(ckpt.CheckpointError, match="meta data cannot be read"):
        checkpointer.restore(small_state(), step=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    _garble_meta(tmp_path, 1)
    (tmp_path / ckpt.REJECTED_DIR / "2").mkdir(parents=True)  # an earlier rejection of step 2
    with caplog.at_level(logging.WARNING), pytest.raises(
            ckpt.CheckpointError, match=r"no usable checkpoint in .*: 2 \(.*\); 1 \(.*\)\. .*step 0"):
        checkpointer.restore(small_state())
    checkpointer.close()
    assert os.listdir(tmp_path / "checkpoints") == []
    assert sorted(os.listdir(tmp_path / ckpt.REJECTED_DIR)) == ["1", "2", "2-1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "falling back to step 1" in warnings[0]
    assert "no older checkpoint left" in warnings[1] and all("\n" not in w for w in warnings)


def test_checkpoint_without_fingerprint_restores_with_a_warning(tmp_path, caplog):
    state = small_state(2)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave({"step": 3})))
    manager.close()
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    with caplog.at_level(logging.WARNING):
        restored, meta = checkpointer.restore(small_state())
    checkpointer.close()
    assert meta == {"step": 3} and int(restored["step"]) == 2
    assert any("has no fingerprint" in r.getMessage() for r in caplog.records)


def test_fingerprint_of_another_version_restores_unverified_with_a_warning(tmp_path, caplog):
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, small_state(1), {"step": 1})
    meta_file = tmp_path / "checkpoints" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["fingerprint"]["version"] = 1
    meta["fingerprint"]["leaves"]["['w']"][2] += 1  # what version 1 computed differs
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        restored, _ = checkpointer.restore(small_state())
    checkpointer.close()
    assert int(restored["step"]) == 1 and os.listdir(tmp_path / "checkpoints") == ["1"]
    assert any("fingerprint of another version (1" in r.getMessage() for r in caplog.records)


# --- The config check before a resume ------------------------------------------------------

def run_config(workdir) -> ml_collections.ConfigDict:
    config = runpy.run_path(os.path.join(ROOT, "configs", "scienceworld.py"))["get_config"]()
    config.workdir = str(workdir)
    return config


def test_config_changes_sorts_fields_into_resumable_refused_and_unrecorded():
    saved = {"workdir": "a", "seed": 0, "train": {"total_steps": 20}, "eval": {"every_steps": 10},
             "model": {"remat": True, "dtype": "float32"}, "mesh": {"data": -1}, "gone": 1,
             "checkpoint": {"every_steps": 2, "keep": 3}, "rollout": {"engine": "turns", "temperature": 1.0}}
    new = {"workdir": "b", "seed": 0, "train": {"total_steps": 40}, "eval": {"every_steps": 5},
           "model": {"remat": False, "dtype": "bfloat16"}, "mesh": {"data": 4}, "added": {"x": 1},
           "checkpoint": {"every_steps": 2, "keep": 1}, "rollout": {"engine": "continuous", "temperature": 0.5}}
    resumable, refused, unrecorded = ckpt.config_changes(saved, new)
    assert resumable == {"workdir": ("a", "b"), "eval.every_steps": (10, 5), "model.remat": (True, False),
                         "mesh.data": (-1, 4), "checkpoint.keep": (3, 1),
                         "rollout.engine": ("turns", "continuous")}  # both engines draw the same replies
    assert refused == {"train.total_steps": (20, 40), "model.dtype": ("float32", "bfloat16"),
                       "rollout.temperature": (1.0, 0.5)}
    assert unrecorded == ["added.x", "gone"]


def _write_run_config(config) -> None:
    os.makedirs(config.workdir, exist_ok=True)
    with open(os.path.join(config.workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def test_resume_with_another_algorithm_is_refused_in_one_line_naming_each_field(tmp_path):
    _write_run_config(run_config(tmp_path))
    new = run_config(tmp_path)
    new.algo.advantage, new.algo.critic, new.train.total_steps = "grpo", "separate", 40
    new.eval.every_steps = 3
    with pytest.raises(ValueError) as error:
        ckpt.check_resume_config(str(tmp_path), new)
    message = str(error.value)
    assert "\n" not in message
    for part in ("algo.advantage ('ppo_gae' -> 'grpo')", "algo.critic ('value_head' -> 'separate')",
                 "train.total_steps (20 -> 40)", "set them back", "new workdir"):
        assert part in message
    assert "eval.every_steps (" not in message  # a change that may be made is not refused


def test_resume_with_resumable_changes_only_passes_with_a_warning(tmp_path, caplog):
    _write_run_config(run_config(tmp_path))
    new = run_config(tmp_path)
    new.eval.every_steps, new.checkpoint.every_steps, new.model.remat = 3, 1, False
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume_config(str(tmp_path), new)
        ckpt.check_resume_config(str(tmp_path / "elsewhere"), new)  # no config.json: not checked
    messages = [r.getMessage() for r in caplog.records]
    assert any("eval.every_steps (10 -> 3)" in m and "model.remat (True -> False)" in m for m in messages)
    assert any("config.json is missing" in m for m in messages)
