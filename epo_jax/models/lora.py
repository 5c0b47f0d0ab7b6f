"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685) on the decoder's projections.

A targeted projection computes

    y = x W + b + (alpha / r) (x A) B,   A [in, r] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [r, out] = 0

with W, b frozen and only A and B trained; `in` and `out` are the projection's input and output
sizes flattened (q_proj: in = D, out = N * Hd; o_proj: in = N * Hd, out = D), which is PEFT's
[out, in] layout transposed: PEFT's `lora_A.weight` is A^T [r, in], `lora_B.weight` is B^T
[out, r], and the merged weight is W + (alpha / r) A B (`merged`). A is initialised as PEFT's
default (kaiming-uniform with a = sqrt(5)); B = 0 makes the adapted model equal the base at init.

The adapters are `flax.nnx.LoRA` modules (`Adapter`) with `nnx.LoRAParam` parameters, attached
to `transformer.Projection.adapter`; A inherits the mesh axis of the kernel's first input
dimension and B that of its first output dimension, so the adapters shard like the weights they
adapt. The adapted model is an ordinary (graphdef, params) pair: every pure function of
`transformer` and the sampler run it unchanged, and `base_params(params)` / `adapter_params`
separate the frozen weights from the trained ones by variable type.

Why nnx.LoRA and not qwix's `LoraProvider`: qwix intercepts the dot_general of our projections
and derives the adapters' shardings from our annotations, but for an NNX model it intercepts one
method only (`quantize_model` refuses several), so the sampler's `prefill` / `decode` would run
without the adapters; and its adapters take the dtype of the weight they adapt, so a bfloat16
base would train bfloat16 adapters.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epo_jax.models.transformer import Projection, Transformer

# Config name of each target -> the projection it adapts (Hugging Face / PEFT module names).
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
ADAPTER_ATTRIBUTE = "adapter"  # the attribute of a Projection that holds its adapter


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections get adapters, of what rank and scale, and their parameter dtype."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank} must be >= 1 (rank 0 means no adapters).")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {self.targets} must be a non-empty subset of {tuple(TARGETS)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def modules(self) -> tuple[str, ...]:
        """The adapted projections' names, in TARGETS order."""
        return tuple(name for target, name in TARGETS.items() if target in self.targets)

    @classmethod
    def from_config(cls, config) -> "LoraSpec | None":
        """The spec of a run config's `model.lora` (None for rank 0: full fine-tuning); the
        adapters are stored in `model.param_dtype`."""
        lora = config.model.lora
        if not lora.rank:
            return None
        return cls(rank=int(lora.rank), alpha=float(lora.alpha), targets=tuple(lora.targets),
                   param_dtype=config.model.param_dtype)


def _peft_a_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """PEFT's init of A: torch's kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Adapter(nnx.LoRA):
    """nnx.LoRA on a projection's flattened input and output: (alpha / r) (x A) B, shaped as the
    projection's output. Computes in the model's compute dtype, as the base projection does."""

    def __init__(self, in_dims: tuple[int, ...], out_dims: tuple[int, ...], kernel_sharding: Sequence[str | None],
                 spec: LoraSpec, compute_dtype: Any, rngs: nnx.Rngs):
        sharding = tuple(kernel_sharding) if kernel_sharding else (None,) * (len(in_dims) + len(out_dims))
        super().__init__(
            math.prod(in_dims), spec.rank, math.prod(out_dims), dtype=jnp.dtype(compute_dtype),
            param_dtype=jnp.dtype(spec.param_dtype), a_initializer=_peft_a_init, rngs=rngs,
            a_metadata={"out_sharding": (sharding[0], None), "eager_sharding": False},
            b_metadata={"out_sharding": (None, sharding[len(in_dims)]), "eager_sharding": False})
        self.in_dims, self.out_dims, self.scale = tuple(in_dims), tuple(out_dims), spec.scale

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:x.ndim - len(self.in_dims)]
        delta = super().__call__(x.reshape(*lead, self.in_features))
        return (delta * jnp.asarray(self.scale, delta.dtype)).reshape(*lead, *self.out_dims)


def _targeted(model: Transformer, spec: LoraSpec):
    """(path, projection) of every projection the spec adapts."""
    return [(path, module) for path, module in nnx.iter_modules(model)
            if isinstance(module, Projection) and path and path[-1] in spec.modules]


def add_to_model(model: Transformer, spec: LoraSpec, rngs: nnx.Rngs) -> Transformer:
    """Attaches a fresh adapter to every targeted projection of `model` (in place) and returns it."""
    for _, projection in _targeted(model, spec):
        kernel = projection.kernel
        in_dims = tuple(kernel.shape[:projection.num_in_dims])
        out_dims = tuple(kernel.shape[projection.num_in_dims:])
        setattr(projection, ADAPTER_ATTRIBUTE,
                Adapter(in_dims, out_dims, kernel.get_metadata().get("out_sharding"), spec, model.config.dtype, rngs))
    return model


def with_adapters(graphdef: nnx.GraphDef, params: nnx.State, spec: LoraSpec, key: jax.Array
                  ) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of the base model with fresh adapters: params hold the base's arrays
    themselves (no copy) and the adapters, A drawn from `key`, B = 0."""
    model = add_to_model(nnx.merge(graphdef, params), spec, nnx.Rngs(params=key))
    return nnx.split(model)


def abstract_with_adapters(config, spec: LoraSpec) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of `config`'s model with adapters, as jax.ShapeDtypeStruct leaves."""
    return nnx.split(nnx.eval_shape(lambda: add_to_model(Transformer(config, None), spec, nnx.Rngs(0))))


def adapter_params(params: nnx.State) -> nnx.State:
    """The adapters (nnx.LoRAParam) of a model's params."""
    return nnx.filter_state(params, nnx.LoRAParam)


def base_params(params: nnx.State) -> nnx.State:
    """Everything but the adapters: the base model's params, laid out for the base graphdef."""
    return nnx.filter_state(params, nnx.Not(nnx.LoRAParam))


def reinitialized(adapters: nnx.State, key: jax.Array) -> nnx.State:
    """Fresh adapters of the same layout: every A drawn anew from `key`, every B = 0."""
    flat = nnx.to_flat_state(adapters)
    keys = jax.random.split(key, len(flat))
    fresh = []
    for (path, variable), leaf_key in zip(flat, keys):
        value = (_peft_a_init(leaf_key, variable.shape, variable.dtype) if path[-1] == "lora_a"
                 else jnp.zeros(variable.shape, variable.dtype))
        fresh.append((path, variable.replace(value)))
    return nnx.from_flat_state(fresh)


def has_adapters(params: Any) -> bool:
    return isinstance(params, nnx.State) and bool(jax.tree.leaves(adapter_params(params)))


def merged(graphdef: nnx.GraphDef, params: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of the base architecture with each adapter folded into its kernel:
    W + (alpha / r) A B, computed in float32 and stored in the wider of the kernel's and the
    adapter's dtypes."""
    model = nnx.merge(graphdef, params)
    for _, projection in nnx.iter_modules(model):
        adapter = getattr(projection, ADAPTER_ATTRIBUTE, None) if isinstance(projection, Projection) else None
        if adapter is None:
            continue
        kernel = projection.kernel[...]
        delta = adapter.scale * (adapter.lora_a[...].astype(jnp.float32) @ adapter.lora_b[...].astype(jnp.float32))
        dtype = jnp.promote_types(kernel.dtype, adapter.lora_a[...].dtype)
        projection.kernel = nnx.Param((kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(dtype),
                                      **projection.kernel.get_metadata())
        setattr(projection, ADAPTER_ATTRIBUTE, None)
    return nnx.split(model)


def peft_name(path: tuple[Any, ...]) -> str:
    """PEFT's tensor name of an adapter param path: ('layers', 0, 'self_attn', 'q_proj', 'adapter',
    'lora_a') -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    *module, attribute, which = path
    if attribute != ADAPTER_ATTRIBUTE or which not in ("lora_a", "lora_b"):
        raise ValueError(f"{path} is not an adapter param path")
    matrix = "lora_A" if which == "lora_a" else "lora_B"
    return f"base_model.model.model.{'.'.join(map(str, module))}.{matrix}.weight"


def peft_tensors(params: nnx.State) -> dict[str, np.ndarray]:
    """The adapters of `params` as PEFT's adapter_model.safetensors holds them: lora_A [r, in] = A^T,
    lora_B [out, r] = B^T (contiguous float arrays)."""
    return {peft_name(path): np.ascontiguousarray(np.asarray(variable.get_value()).T)
            for path, variable in nnx.to_flat_state(adapter_params(params))}


def peft_config(spec: LoraSpec, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json of PEFT's LoraConfig for these adapters (no dropout, no bias, no rsLoRA)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(spec.modules), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
