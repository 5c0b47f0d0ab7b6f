"""`python -m epo_jax.export`: a run's checkpointed policy -> a Hugging Face folder that transformers
loads with the same logits as our model.

The run directory is built by hand, without the trainer: a tiny random Llama saved as the base
model, the run's config.json pointing at it, and two checkpoints of perturbed parameters written
by the trainer's Checkpointer from a sharded TrainState (data 4 x fsdp 2), with a value head and
AdamW moments that the export must leave behind.
"""
import json
import os
import runpy
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from epo_jax import export as export_lib
from epo_jax.models import lora, transformer
from epo_jax.models.config import ModelConfig
from epo_jax.models.loading import load_pretrained, save_pretrained
from epo_jax.train import actor_critic, optim, sharding
from epo_jax.train.checkpoint import Checkpointer
from epo_jax.train.update import checkpointed, init_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = "<think>The door is north.</think> <action>go north</action>"
TOKENS = np.array([[5, 17, 42, 99, 3, 250, 7, 61, 128, 33, 2, 77],
                   [301, 12, 9, 88, 140, 6, 210, 45, 19, 270, 1, 58]], np.int32)


def toy_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of ~300 tokens with ChatML specials."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([TEXT, "You are in a kitchen. You see a fridge and a stove."] * 20, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False)


def tiny_model_config(hidden_size: int = 32) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=320, hidden_size=hidden_size, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                       pad_token_id=2)


def run_config(workdir: str, model_path: str):
    config = runpy.run_path(os.path.join(ROOT, "configs", "base.py"))["get_config"]()
    config.workdir = workdir
    config.model.path = model_path
    config.train.total_steps = 10
    return config


def perturbed(params, seed: int):
    """Every parameter moved by N(0, 0.2^2): the checkpoint differs clearly from the base model."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda leaf: leaf + (0.2 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), params)


def write_run_config(config) -> None:
    os.makedirs(config.workdir, exist_ok=True)
    with open(os.path.join(config.workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, graphdef, base params, {step: policy params}) of a hand-built run."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = toy_tokenizer()
    model_config = tiny_model_config()
    graphdef, base_params = transformer.init_params(model_config, jax.random.key(0))
    base_dir = str(root / "base-model")
    save_pretrained(base_params, model_config, tokenizer, base_dir)

    config = run_config(str(root / "run"), base_dir)
    write_run_config(config)
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    config.mesh.data, config.mesh.fsdp = 4, 2
    mesh = sharding.make_mesh(config.mesh)
    optimizer = optim.make_optimizer(config.optim, 10)
    checkpointer = Checkpointer(config.workdir, keep=3, async_save=False)
    policies = {}
    for step in (2, 4):
        policies[step] = perturbed(base_params, seed=step)
        params = actor_critic.init_params(config, policies[step], model_config.hidden_size)
        state = init_train_state(config, params, optimizer, mesh)
        checkpointer.save(step, state, {"step": step, "cursor": 0})
    checkpointer.close()
    return config.workdir, graphdef, base_params, policies


def our_logits(graphdef, params) -> np.ndarray:
    return np.asarray(jax.jit(transformer.logits, static_argnums=0)(graphdef, params, TOKENS))


def test_exported_folder_loads_in_transformers_with_our_logits(run, tmp_path):
    import torch

    workdir, graphdef, base_params, policies = run
    out = str(tmp_path / "exported")
    # A single-device process, as on a workstation after training on a mesh of 8.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "epo_jax.export", f"--workdir={workdir}", f"--out={out}"],
                            cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "step 4" in result.stdout

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    expected = our_logits(graphdef, policies[4])
    assert hf_logits.shape == expected.shape == (2, TOKENS.shape[1], 320)
    np.testing.assert_allclose(hf_logits, expected, rtol=0, atol=1e-4)
    # The latest checkpoint was exported, not the base model nor the older checkpoint.
    assert np.max(np.abs(hf_logits - our_logits(graphdef, base_params))) > 1e-2
    assert np.max(np.abs(hf_logits - our_logits(graphdef, policies[2]))) > 1e-2

    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer(TEXT)["input_ids"] == toy_tokenizer()(TEXT)["input_ids"]
    assert reloaded_tokenizer.chat_template == CHATML_TEMPLATE


def test_export_of_a_chosen_step_holds_that_steps_params(run, tmp_path):
    workdir, _, _, policies = run
    out = str(tmp_path / "step2")
    assert export_lib.export(workdir, out, step=2) == 2
    exported = load_pretrained(out).params
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(policies[2]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_unknown_step_names_the_available_ones(run, tmp_path):
    with pytest.raises(ValueError, match=r"--step=3 .*available steps: \[2, 4\]"):
        export_lib.export(run[0], str(tmp_path / "out"), step=3)


def test_missing_run_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.* is missing"):
        export_lib.export(str(tmp_path), str(tmp_path / "out"))


def test_run_without_checkpoints_names_the_directory(tmp_path):
    config = run_config(str(tmp_path / "run"), "")
    write_run_config(config)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in .*run.*checkpoints"):
        export_lib.export(config.workdir, str(tmp_path / "out"))


def test_base_model_of_another_architecture_is_reported(run, tmp_path):
    """A config.json whose model.path is a model of another width cannot hold the checkpoint."""
    workdir, _, _, _ = run
    other_dir = str(tmp_path / "wider-model")
    _, wide_params = transformer.init_params(tiny_model_config(hidden_size=48), jax.random.key(1))
    save_pretrained(wide_params, tiny_model_config(hidden_size=48), toy_tokenizer(), other_dir)
    mismatched = run_config(str(tmp_path / "run"), other_dir)
    write_run_config(mismatched)
    os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(mismatched.workdir, "checkpoints"))
    with pytest.raises(ValueError, match="does not hold policy params of the run's base model"):
        export_lib.export(mismatched.workdir, str(tmp_path / "out"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """(workdir, base dir, graphdef with adapters, base + adapters of the checkpoint) of a hand-built
    LoRA run (rank 4, alpha 8, q, v, o, up, down), random A and B, and a value head, checkpointed as the
    trainer does: adapters, head and moments, no base weight."""
    root = tmp_path_factory.mktemp("export_lora")
    model_config = tiny_model_config()
    graphdef, base_params = transformer.init_params(model_config, jax.random.key(0))
    base_dir = str(root / "base-model")
    save_pretrained(base_params, model_config, toy_tokenizer(), base_dir)
    config = run_config(str(root / "run"), base_dir)
    config.model.lora.rank, config.model.lora.alpha = 4, 8.0
    config.model.lora.targets = ("q", "v", "o", "up", "down")
    write_run_config(config)
    lora_graphdef, policy = actor_critic.policy_model(config, graphdef, base_params)
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype), lora.adapter_params(policy))
    policy = nnx.merge_state(lora.base_params(policy), adapters)
    config.algo.advantage = "ppo_gae"
    params = actor_critic.init_params(config, policy, model_config.hidden_size)
    state = init_train_state(config, params, optim.make_optimizer(config.optim, 10), sharding.make_mesh(config.mesh))
    checkpointer = Checkpointer(config.workdir, keep=3, async_save=False)
    checkpointer.save(3, checkpointed(state), {"step": 3, "cursor": 0})
    checkpointer.close()
    return config.workdir, base_dir, lora_graphdef, policy


def test_lora_checkpoint_holds_no_base_weight(lora_run):
    workdir = lora_run[0]
    saved = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "3", "state"))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(saved["params"]["policy"])[0]]
    assert paths and all("adapter" in p for p in paths)


def test_lora_export_merges_the_adapters_into_a_plain_folder(lora_run, tmp_path):
    import torch

    workdir, base_dir, lora_graphdef, policy = lora_run
    out = str(tmp_path / "merged")
    assert export_lib.export(workdir, out) == 3
    assert not os.path.exists(os.path.join(out, export_lib.PEFT_CONFIG_FILE))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(hf_logits, our_logits(lora_graphdef, policy), rtol=0, atol=1e-4)
    base = load_pretrained(base_dir)
    assert np.max(np.abs(hf_logits - our_logits(base.graphdef, base.params))) > 1e-1  # the adapters are in


def test_lora_adapter_folder_loads_through_peft_with_our_logits(lora_run, tmp_path):
    import peft
    import torch

    workdir, base_dir, lora_graphdef, policy = lora_run
    out = str(tmp_path / "adapter")
    assert export_lib.export(workdir, out, adapter=True) == 3
    with open(os.path.join(out, export_lib.PEFT_CONFIG_FILE), encoding="utf-8") as f:
        adapter_config = json.load(f)
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(base_dir)
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        peft_logits = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(peft_logits, our_logits(lora_graphdef, policy), rtol=0, atol=1e-4)


def test_adapter_export_of_a_full_fine_tune_is_refused(run, tmp_path):
    with pytest.raises(ValueError, match=r"--adapter exports LoRA adapters.*model\.lora\.rank = 0"):
        export_lib.export(run[0], str(tmp_path / "out"), adapter=True)
