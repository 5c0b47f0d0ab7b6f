"""Sizes an RL run for accelerators this machine does not have, by compiling the run's programs for them.

    python -m epo_jax.plan --config=configs/scienceworld.py:reference \\
        --config.model.path=epo_jax/models/architectures/Qwen2.5-7B-Instruct --devices=8 --chip=h100-80gb

The model folder needs only a config.json (epo_jax/models/architectures ships those of Qwen2.5-0.5B / 3B /
7B-Instruct); the planner takes the run's own --config flags. Nothing the size of the model is allocated:

1. The model's parameters are abstract (`transformer.abstract_params`: shapes and dtypes) and laid out
   on a (data, fsdp, tensor) mesh of N simulated CPU devices (XLA's host-platform device count) as the
   trainer lays them out: the train state of `update.init_train_state`, the frozen KL reference.
2. The programs of an RL step are lowered and compiled for that mesh, the same jitted functions the
   trainer runs: the update and the score pass (`trainer.jit_learner_programs`) at the step's row
   count and the largest prompt bucket, the sampler's prefill and decode (`Sampler.lower_prefill`,
   `lower_decode`) for the rollout batch of all environments.
3. Per device, `compiled.memory_analysis()` gives the arguments, outputs (and those written over
   donated inputs) and temporaries of each program; live at its peak are the resident train state
   and KL reference, the program's other inputs, its temporaries and its new outputs. That is
   compared with the chip's usable memory.
4. FLOPs per RL step come from `compiled.cost_analysis()`. XLA counts a loop body once, whatever its
   trip count, so the FLOPs are taken from flat variants of the same functions (one micro-batch,
   one attention block, one log-prob chunk), at one and two decoder layers, extrapolated to the
   model's depth (the layers are identical), then multiplied by the step's micro-batches, turns
   and new tokens.
5. The smallest mesh that fits: device counts dividing N, every data x fsdp x tensor split of
   them, micro-batches from the config's down to one row per device; candidates whose resident
   state alone overflows the chip are dropped without compiling, the others are compiled at two
   depths and extrapolated.

Memory is the CPU compiler's buffer assignment, an estimate: GPU and TPU compilers fuse, schedule
and rematerialise differently, and XLA:CPU computes bfloat16 matrix products in float32 (its
temporaries hold float32 copies a GPU does not make). Fused attention kernels (cuDNN, splash) do
not compile on a CPU: the planner compiles the query-chunked XLA attention, whose score blocks a
fused kernel does not hold, so its attention temporaries are an upper bound for the chip's kernel.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import app, flags, logging

from epo_jax import config as config_lib
from epo_jax import main as run_main  # the run's --config / --verbose flags and their checks
from epo_jax.algo import LossSettings, loss_state_init
from epo_jax.errors import UserError
from epo_jax.models import config as model_config_lib, lora, transformer
from epo_jax.rollout import agent_loop
from epo_jax.train import actor_critic, batch as batch_lib, optim, sharding, trainer
from epo_jax.train.batch_advantages import make_advantage_fn
from epo_jax.train.update import TrainState

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: vendor figures (dense bfloat16 peak, HBM size and bandwidth)."""

    name: str
    platform: str            # "gpu" | "tpu": what model.dtype / model.attention "auto" resolve for
    memory_bytes: int        # HBM per device, as the runtime reports it
    usable_fraction: float   # of it a run may take (below)
    bf16_flops: float        # dense bfloat16 peak FLOP/s per device
    hbm_bytes_per_s: float

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * self.usable_fraction


# GPUs: JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of the memory, which launch/gpu_slurm.sh sets
# to 0.92; TPUs: the runtime keeps a little of the HBM for itself (taken here as 5%).
_GPU_USABLE, _TPU_USABLE = 0.92, 0.95
CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("h100-80gb", "gpu", 81559 * 2 ** 20, _GPU_USABLE, 989e12, 3.35e12),   # H100 SXM
    Chip("h200-141gb", "gpu", 143771 * 2 ** 20, _GPU_USABLE, 989e12, 4.8e12),
    Chip("a100-80gb", "gpu", 81920 * 2 ** 20, _GPU_USABLE, 312e12, 2.039e12),  # A100 SXM
    Chip("tpu-v4", "tpu", 32 * GiB, _TPU_USABLE, 275e12, 1.2e12),
    Chip("tpu-v5e", "tpu", 16 * GiB, _TPU_USABLE, 197e12, 0.819e12),
    Chip("tpu-v5p", "tpu", 95 * GiB, _TPU_USABLE, 459e12, 2.765e12),
    Chip("tpu-v6e", "tpu", 32 * GiB, _TPU_USABLE, 918e12, 1.64e12),
)}

# XLA:CPU drops the optimization barriers that jax.checkpoint places around rematerialised layers
# (its cse_barrier_expander pass) before scheduling, so its scheduler hoists the recomputation into
# the forward pass and remat saves nothing; GPU and TPU keep them. The planner compiles (never runs)
# with the pass off, so that the buffer assignment sees remat as a GPU or TPU would.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}

_DEVICES = flags.DEFINE_integer("devices", 8, "Devices of the planned run (simulated as CPU devices).")
_CHIP = flags.DEFINE_string("chip", "h100-80gb", f"Accelerator of the planned run: one of {', '.join(CHIPS)}.")
_MFU = flags.DEFINE_float(
    "mfu", 0.4, "Model FLOPs utilisation assumed for the update, the score pass and the prefill (0-1].")
_HBM_EFFICIENCY = flags.DEFINE_float(
    "hbm_efficiency", 0.6, "Fraction of the HBM bandwidth a decode step is assumed to reach (0-1].")
_PROMPT_LEN = flags.DEFINE_integer(
    "prompt_len", 0, "Prompt bucket the step's rows are padded to; 0 = the largest (rollout.prompt_buckets).")
_TURNS = flags.DEFINE_integer("turns", 0, "Turns each episode plays; 0 = env.max_turns (every episode runs out).")
_SEARCH = flags.DEFINE_bool("search", True, "Search for the smallest mesh and micro-batch that fit.")
_JSON = flags.DEFINE_string("json", "", "Also write the plan as JSON to this file.")
_CACHE = flags.DEFINE_string(
    "cache", "", "A JSON file keeping compiled programs' figures between planner runs, so that plans of one "
    "config for several chips share their compiles.")


# ----------------------------------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class Workload:
    """The shapes of one RL step of a config (every episode playing `turns` turns)."""

    prompt_len: int          # the prompt bucket every row is padded to
    response_len: int
    turns: int
    environments: int        # rollout rows per turn before bucketing
    samples: int             # turn samples per step = environments x turns
    update_rows: int         # the update batch's rows (batch.update_rows)
    total_steps: int


def _workload(config, prompt_len: int, turns: int) -> Workload:
    buckets = tuple(config.rollout.prompt_buckets)
    if prompt_len and prompt_len not in buckets:
        raise UserError(f"--prompt_len={prompt_len} is not one of rollout.prompt_buckets {buckets}; pick one, "
                        "or 0 for the largest")
    if turns < 0:
        raise UserError(f"--turns={turns} must be >= 1, or 0 for env.max_turns")
    turns = turns or int(config.env.max_turns)
    environments = int(config.env.num_groups) * int(config.env.group_size)
    samples = environments * turns
    rows = batch_lib.update_rows(samples, num_minibatches=config.algo.num_minibatches,
                                 micro_batch_size=config.algo.micro_batch_size)
    return Workload(prompt_len=prompt_len or buckets[-1], response_len=int(config.rollout.max_response_len),
                    turns=turns, environments=environments, samples=samples, update_rows=rows,
                    total_steps=int(config.train.total_steps))


def _hf_config(model_path: str) -> dict[str, Any]:
    path = os.path.join(model_path, "config.json")
    if not model_path or not os.path.isfile(path):
        raise UserError(f"--config.model.path={model_path!r} has no config.json: the planner needs a model folder "
                        "(an architecture-only one will do: epo_jax/models/architectures/Qwen2.5-7B-Instruct)")
    with open(path) as f:
        return json.load(f)


def model_config_for(config, hf: dict[str, Any], chip: Chip, *, num_layers: int | None = None,
                     query_chunk: int | None = None):
    """The ModelConfig a run on `chip` builds (model.dtype "auto" resolved for the chip), compiled
    with the XLA attention this CPU can compile; optionally cut to `num_layers` decoder layers."""
    hf = dict(hf, num_hidden_layers=num_layers) if num_layers else hf
    try:
        model_config = model_config_lib.from_hf_config(
            hf, dtype=config.model.dtype, param_dtype=actor_critic.base_param_dtype(config),
            remat=config.model.remat, attention="xla", platform=chip.platform)
    except ValueError as error:
        raise UserError(f"--config.model.path: {error}") from error
    return model_config.replace(attention_query_chunk=query_chunk) if query_chunk else model_config


def chip_attention(config, hf: dict[str, Any], chip: Chip) -> str:
    """The attention kernel the run would take on the chip (checks an explicit model.attention)."""
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    try:
        return model_config_lib.resolve_numerics(config.model.dtype, config.model.attention, int(head_dim),
                                                 chip.platform)["attention"]
    except ValueError as error:
        raise UserError(f"{error} (planning for {chip.name})") from error


def with_layout(config, mesh_shape: Sequence[int], micro_batch_size: int, **algo_overrides):
    """A copy of the config with another mesh and micro-batch (and algo fields)."""
    out = config.copy_and_resolve_references()
    out.mesh.data, out.mesh.fsdp, out.mesh.tensor = (int(a) for a in mesh_shape)
    out.algo.micro_batch_size = int(micro_batch_size)
    for key, value in algo_overrides.items():
        out.algo[key] = value
    return out


# ---------------------------------------------------------------------------- abstract train state

def _shaped(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded jax.ShapeDtypeStructs (its largest shard)."""

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        itemsize = np.dtype(leaf.dtype).itemsize if not jax.dtypes.issubdtype(
            leaf.dtype, jax.dtypes.extended) else 8
        total += int(np.prod(shape, dtype=np.int64)) * itemsize
    return total


@dataclasses.dataclass
class AbstractRun:
    """What the trainer would hold on the mesh, as sharded jax.ShapeDtypeStructs."""

    mesh: Any
    graphdef: Any             # the trained model's (with LoRA: the base with adapters)
    reference_graphdef: Any   # the KL reference's (with LoRA: the base's; None: the trained model's)
    model_config: Any
    optimizer: Any
    state: Any                # TrainState
    ref_params: Any           # a frozen copy of the policy for the KL loss (None without it, or with LoRA)
    config: Any

    @property
    def resident_bytes(self) -> int:
        """Per device: the train state and the KL reference's copy, held for the whole run."""
        return device_bytes(self.state) + (device_bytes(self.ref_params) if self.ref_params is not None else 0)

    @property
    def reference_args(self) -> Any:
        """The score pass's reference argument: the copy, or under LoRA the base weights of the
        state's policy itself (the same buffers, no new bytes), as the trainer passes it."""
        return actor_critic.kl_reference(self.config, self.state.params, self.ref_params)


def abstract_run(config, model_config, devices) -> AbstractRun:
    """The train state of `update.init_train_state` (params placed by `sharding.param_shardings`,
    optimizer moments following their trained params, small leaves replicated) and the KL
    reference, without allocating them. With LoRA (model.lora.rank > 0) the policy is the base (in
    model.lora.base_dtype, `model_config`'s param dtype) with adapters, the optimizer holds moments
    of the adapters and heads only, and the KL reference is the base itself: no copy."""
    mesh = _make_mesh(config, devices)
    graphdef, policy = transformer.abstract_params(model_config)
    reference_graphdef = None
    spec = lora.LoraSpec.from_config(config)
    if spec is not None:
        reference_graphdef = graphdef
        graphdef, policy = lora.abstract_with_adapters(model_config, spec)
    params = jax.eval_shape(lambda p: actor_critic.init_params(config, p, model_config.hidden_size), policy)
    params = _shaped(params, sharding.param_shardings(params, mesh))
    optimizer = optim.make_run_optimizer(config)
    replicated = sharding.replicated(mesh)
    trainable = actor_critic.split_trainable(params)[0]
    abstract_opt_state = jax.eval_shape(optimizer.init, trainable)
    opt_state = _shaped(abstract_opt_state, sharding.opt_state_shardings(abstract_opt_state, trainable, mesh))
    small = jax.eval_shape(lambda: (loss_state_init(LossSettings.from_config(config)), jax.random.key(config.seed)))
    loss_state, rng = _shaped(small, jax.tree.map(lambda _: replicated, small))
    state = TrainState(params=params, opt_state=opt_state, loss_state=loss_state, rng=rng)
    ref_params = params["policy"] if config.algo.use_kl_loss and spec is None else None
    return AbstractRun(mesh, graphdef, reference_graphdef, model_config, optimizer, state, ref_params, config)


def _make_mesh(config, devices):
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as error:
        raise UserError(f"{error} (--devices={len(devices)})") from error
    if config.algo.micro_batch_size % sharding.batch_divisor(mesh):
        raise UserError(f"algo.micro_batch_size={config.algo.micro_batch_size} must be a multiple of the batch "
                        f"shards (mesh data x fsdp = {sharding.batch_divisor(mesh)}); set "
                        "--config.algo.micro_batch_size")
    return mesh


# --------------------------------------------------------------------------------------- programs

@dataclasses.dataclass
class ProgramCost:
    """One compiled program, per device."""

    name: str
    argument: int
    output: int
    alias: int          # outputs written over donated inputs
    temp: int
    extra_inputs: int   # inputs beyond the resident train state and KL reference
    flops: float        # as XLA counts them (a loop body once)
    compile_s: float

    def live_peak(self, resident: int) -> int:
        """Bytes live at the program's peak: resident state + other inputs + temporaries + new outputs."""
        return resident + self.extra_inputs + self.temp + self.output - self.alias

    def scaled(self, factor: float, base: ProgramCost) -> ProgramCost:
        """base + factor x (self - base), field by field: the affine extrapolation in depth."""
        def at(field: str) -> float:
            return getattr(base, field) + factor * (getattr(self, field) - getattr(base, field))
        return ProgramCost(self.name, *(int(round(at(f))) for f in ("argument", "output", "alias", "temp",
                                                                      "extra_inputs")),
                           at("flops"), self.compile_s + base.compile_s)


def _compile(name: str, lowered, extra_inputs: int) -> tuple[ProgramCost, Any]:
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=COMPILER_OPTIONS)
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    logging.info("compiled %s in %.1f s", name, seconds)
    return ProgramCost(name, int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes),
                       int(memory.alias_size_in_bytes), int(memory.temp_size_in_bytes), int(extra_inputs),
                       float(cost.get("flops", 0.0)), seconds), compiled


def _abstract_update_batch(config, run: AbstractRun, programs, rows: int, prompt_len: int) -> tuple[dict, dict]:
    """(the score pass's inputs, the update's inputs): the batch builder's arrays at `rows` x
    (prompt_len + response) and what the score pass and the advantages add, sharded over data x fsdp."""
    host = batch_lib.build_batch([], prompt_buckets=config.rollout.prompt_buckets,
                                 response_len=config.rollout.max_response_len, rows=rows, pad_id=0,
                                 padding_id_start=0, prompt_len=prompt_len)

    def placed(tree):
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(run.mesh, len(v.shape)))
                for k, v in tree.items()}

    batch = placed(host)
    scored, _ = jax.eval_shape(_score_program(config, programs), run.state.params, run.reference_args, batch)
    full = dict(batch, **placed(scored))
    full.update(placed(jax.eval_shape(make_advantage_fn(config), full, full.get("old_values"))))
    return batch, full


def _score_program(config, programs):
    """The score pass of the run's first RL step (with the trainer's log-probs when it computes them)."""
    return programs.score[trainer.trainer_logprobs_due(config, 1)]


def learner_costs(config, run: AbstractRun, rows: int, prompt_len: int) -> list[ProgramCost]:
    """The update and the score pass at `rows` x (prompt_len + response), compiled."""
    state_sharding = jax.tree.map(lambda x: x.sharding, run.state)
    programs = trainer.jit_learner_programs(config, run.graphdef, run.optimizer, state_sharding,
                                            run.reference_graphdef)
    batch, full = _abstract_update_batch(config, run, programs, rows, prompt_len)
    score_program = _score_program(config, programs)
    score, _ = _compile("score pass", score_program.lower(run.state.params, run.reference_args, batch),
                        device_bytes(batch))
    update, _ = _compile("update", programs.update.lower(run.state, full), device_bytes(full))
    return [update, score]


def sampler_costs(config, run: AbstractRun, environments: int, prompt_len: int,
                  with_decode: bool = True) -> list[ProgramCost]:
    """The rollout's prefill and decode for one turn of every environment, compiled."""
    sampler = agent_loop.make_sampler(config, run.graphdef, run.model_config, _VocabOnlyTokenizer(run.model_config),
                                      run.mesh)
    sampling = agent_loop.sampling_params(config, float(config.rollout.temperature))
    policy = run.state.params["policy"]
    prefill, compiled = _compile("prefill", sampler.lower_prefill(policy, environments, prompt_len, sampling), 0)
    outputs = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                           compiled.out_info, compiled.output_shardings)
    prefill.extra_inputs = prefill.argument - device_bytes(policy)
    if not with_decode:
        return [prefill]
    decode, _ = _compile("decode", sampler.lower_decode(policy, outputs, environments, prompt_len, sampling), 0)
    decode.extra_inputs = decode.argument - device_bytes(policy)
    return [prefill, decode]


class _VocabOnlyTokenizer:
    """Stands in for the tokenizer of a folder that holds only config.json: the sampler's stop-string
    table keeps its shape (stop strings x matcher states x vocabulary) and so the decode program its
    inputs; every token id decodes to no bytes, which changes no memory or FLOP count."""

    eos_token_id = None
    backend_tokenizer = None
    added_tokens_decoder: dict = {}

    def __init__(self, model_config):
        self._vocab_size = model_config.vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    def convert_ids_to_tokens(self, ids):
        return [None] * len(ids)


# ------------------------------------------------------------------------------ depth extrapolation

DEPTHS = (2, 3)  # decoder layers of the compiled stand-ins; the first layer's buffers are special


class CostCache:
    """Compiled programs' figures kept in a JSON file between planner runs (keyed by config, model,
    platform, device count, workload, depth and variant), so that plans for several chips share
    their compiles; a no-op without a path."""

    def __init__(self, path: str = ""):
        self.path = path
        self._entries: dict[str, Any] = {}
        if path and os.path.exists(path):
            with open(path) as f:
                self._entries = json.load(f)

    def get(self, key: str) -> list[ProgramCost] | None:
        entry = self._entries.get(key)
        return None if entry is None else [ProgramCost(**c) for c in entry]

    def put(self, key: str, costs: list[ProgramCost]) -> None:
        if self.path:
            self._entries[key] = [dataclasses.asdict(c) for c in costs]
            with open(self.path, "w") as f:
                json.dump(self._entries, f)


def costs_at_depth(config, hf: dict[str, Any], chip: Chip, devices, workload: Workload, depth: int | None, *,
                   flat: bool = False, parts: Sequence[str] = ("learner", "sampler"),
                   cache: CostCache = CostCache()) -> list[ProgramCost]:
    """The programs of `parts` (the learner's update and score pass, the sampler's prefill and
    decode) at `depth` layers (None = the model's own). `flat` compiles the FLOP-counting variants:
    one micro-batch per minibatch and epoch, one attention block, one log-prob chunk."""
    # The chip enters only through the compute dtype it resolves model.dtype to (the planner compiles
    # the xla attention for every chip), so GPU and TPU plans of one config share their compiles.
    compute_dtype = model_config_for(config, hf, chip).dtype
    key = json.dumps([config.to_json(sort_keys=True), hf, compute_dtype, len(devices), dataclasses.asdict(workload),
                      depth, flat, list(parts)], sort_keys=True)
    costs = cache.get(key)
    if costs is None:
        costs = _compile_at_depth(config, hf, chip, devices, workload, depth, flat=flat, parts=parts)
        cache.put(key, costs)
    return costs


def _compile_at_depth(config, hf, chip, devices, workload, depth, *, flat, parts) -> list[ProgramCost]:
    rows, prompt_len = workload.update_rows, workload.prompt_len
    query_chunk = None
    if flat:
        micro = int(config.algo.micro_batch_size)
        config = with_layout(config, (config.mesh.data, config.mesh.fsdp, config.mesh.tensor), micro,
                             num_minibatches=1, ppo_epochs=1)
        config.model.logprob_chunk_size = micro * workload.response_len
        rows, query_chunk = micro, prompt_len + workload.response_len
    model_config = model_config_for(config, hf, chip, num_layers=depth, query_chunk=query_chunk)
    run = abstract_run(config, model_config, devices)
    costs = []
    if "learner" in parts:
        costs += learner_costs(config, run, rows, prompt_len)
    if "sampler" in parts or "prefill" in parts:
        costs += sampler_costs(config, run, workload.environments, prompt_len, with_decode="sampler" in parts)
    return costs


def extrapolated_costs(config, hf, chip, devices, workload, *, flat: bool = False,
                       parts: Sequence[str] = ("learner", "sampler"), cache: CostCache = CostCache()
                       ) -> list[ProgramCost]:
    """Costs at the model's depth, affine in the layer count through the stand-ins at DEPTHS."""
    low, high = (costs_at_depth(config, hf, chip, devices, workload, depth, flat=flat, parts=parts, cache=cache)
                 for depth in DEPTHS)
    factor = (int(hf["num_hidden_layers"]) - DEPTHS[0]) / (DEPTHS[1] - DEPTHS[0])
    return [h.scaled(factor, l) for l, h in zip(low, high)]


# ------------------------------------------------------------------------------------ FLOPs, time

@dataclasses.dataclass(frozen=True)
class StepEstimate:
    flops: dict[str, float]      # per RL step, all devices, by program
    seconds: dict[str, float]    # per RL step, by program
    mfu: float
    hbm_efficiency: float

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds.values())


def step_estimate(config, workload: Workload, flat: list[ProgramCost], decode: ProgramCost, chip: Chip,
                  num_devices: int, mfu: float, hbm_efficiency: float) -> StepEstimate:
    """FLOPs of one RL step from the flat programs' per-device counts, and the time they imply.

    update, score pass, prefill: compute-bound, at `mfu` of the chip's peak. Decode: each new token
    reads every weight and the whole KV cache (the decode program's arguments), so a token step takes
    the longer of its FLOPs at `mfu` and those bytes at `hbm_efficiency` of the HBM bandwidth."""
    by_name = {c.name: c for c in flat}
    micro_batches = workload.update_rows / int(config.algo.micro_batch_size)
    flops = {
        "update": by_name["update"].flops * num_devices * micro_batches * int(config.algo.ppo_epochs),
        "score pass": by_name["score pass"].flops * num_devices * micro_batches,
        "prefill": by_name["prefill"].flops * num_devices * workload.turns,
        "decode": decode.flops * num_devices * workload.turns * workload.response_len,
    }
    rate = chip.bf16_flops * num_devices * mfu
    seconds = {name: value / rate for name, value in flops.items() if name != "decode"}
    token_s = max(decode.flops / (chip.bf16_flops * mfu), decode.argument / (chip.hbm_bytes_per_s * hbm_efficiency))
    seconds["decode"] = token_s * workload.turns * workload.response_len
    return StepEstimate(flops, seconds, mfu, hbm_efficiency)


# -------------------------------------------------------------------------------------- the search

@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh_shape: tuple[int, int, int]
    micro_batch_size: int
    peak_bytes: int          # the largest live peak over the four programs, per device


def mesh_shapes(num_devices: int, num_kv_heads: int) -> list[tuple[int, int, int]]:
    """Every data x fsdp x tensor split of the devices whose tensor axis divides the KV heads."""
    out = []
    for tensor in range(1, num_devices + 1):
        if num_devices % tensor or num_kv_heads % tensor:
            continue
        for fsdp in range(1, num_devices // tensor + 1):
            if (num_devices // tensor) % fsdp == 0:
                out.append((num_devices // tensor // fsdp, fsdp, tensor))
    return out


def micro_batch_sizes(config, mesh_shape: tuple[int, int, int]) -> list[int]:
    """The config's micro-batch, then halvings down to one row per batch shard."""
    shards = mesh_shape[0] * mesh_shape[1]
    per_shard = max(1, int(config.algo.micro_batch_size) // shards)
    sizes = []
    while per_shard >= 1:
        sizes.append(per_shard * shards)
        per_shard //= 2
    return sizes


def _peak(costs: list[ProgramCost], resident: int) -> int:
    return max(cost.live_peak(resident) for cost in costs)


def search(config, hf, chip: Chip, all_devices, workload: Workload, report: Callable[[str], None],
           cache: CostCache = CostCache()) -> Candidate | None:
    """The smallest device count (dividing len(all_devices)) with a mesh and micro-batch that fit.
    Meshes whose resident state alone overflows the chip are dropped uncompiled; the others are
    tried most sharded first (the likeliest to fit: each try is several compiles), each with its
    largest micro-batch that fits; the first fit is returned."""
    counts = [n for n in range(1, len(all_devices) + 1) if len(all_devices) % n == 0]
    kv_heads = int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    for n in counts:
        devices = all_devices[:n]
        shapes = []
        for shape in mesh_shapes(n, kv_heads):
            layout = with_layout(config, shape, micro_batch_sizes(config, shape)[0])
            resident = abstract_run(layout, model_config_for(layout, hf, chip), devices).resident_bytes
            if resident < chip.usable_bytes:
                shapes.append((resident, shape))
            else:
                report(f"  {n} devices, mesh {_mesh_text(shape)}: resident state {resident / GiB:.1f} GiB > "
                       f"{chip.usable_bytes / GiB:.1f} GiB usable, not compiled")
        for resident, shape in sorted(shapes):
            found = _largest_micro_batch_that_fits(config, hf, chip, devices, workload, shape, resident, report, cache)
            if found is not None:
                return found
    return None


def _largest_micro_batch_that_fits(config, hf, chip, devices, workload, shape, resident, report,
                                   cache) -> Candidate | None:
    """The rollout first (it does not depend on the micro-batch: if it overflows, nothing fits this
    mesh), then one row per batch shard (likewise), then the config's micro-batch and its
    halvings: the first that fits."""
    sizes = micro_batch_sizes(config, shape)

    def costs_of(micro: int, parts: tuple[str, ...]) -> list[ProgramCost]:
        layout = with_layout(config, shape, micro)
        return extrapolated_costs(layout, hf, chip, devices, _workload(layout, workload.prompt_len, workload.turns),
                                  parts=parts, cache=cache)

    rollout = costs_of(sizes[0], ("sampler",))
    if _peak(rollout, resident) > chip.usable_bytes:
        report(f"  {len(devices)} devices, mesh {_mesh_text(shape)}: the rollout's peak "
               f"{_peak(rollout, resident) / GiB:.1f} GiB does not fit")
        return None

    def fitting(micro: int) -> Candidate | None:
        peak = _peak(costs_of(micro, ("learner",)) + rollout, resident)
        fits = peak <= chip.usable_bytes
        report(f"  {len(devices)} devices, mesh {_mesh_text(shape)}, micro-batch {micro}: peak {peak / GiB:.1f} GiB "
               f"({'fits' if fits else 'does not fit'})")
        return Candidate(shape, micro, peak) if fits else None

    smallest = fitting(sizes[-1])
    if smallest is None:
        return None
    return next((found for found in map(fitting, sizes[:-1]) if found is not None), smallest)


def _mesh_text(shape: Sequence[int]) -> str:
    return "data={} fsdp={} tensor={}".format(*shape)


# ------------------------------------------------------------------------------------------- plan

_FULL_DEPTH = flags.DEFINE_bool(
    "full_depth", True, "Compile the configured layout at the model's depth (else: extrapolated from "
    f"{DEPTHS[0]} and {DEPTHS[1]} layers, as the search does).")

CAVEAT = ("memory: XLA:CPU's buffer assignment for the simulated mesh, an estimate: GPU and TPU compilers fuse, "
          "schedule and rematerialise differently, and XLA:CPU computes bfloat16 matrix products in float32 "
          "(temporaries a GPU or TPU does not make)")


def plan(config, *, chip: Chip, num_devices: int, prompt_len: int = 0, turns: int = 0, mfu: float = 0.4,
         hbm_efficiency: float = 0.6, full_depth: bool = True, run_search: bool = True,
         report: Callable[[str], None] = print, cache: CostCache = CostCache()) -> dict[str, Any]:
    """Compiles the config's programs for `num_devices` x `chip` and reports them; returns the plan."""
    t_start = time.perf_counter()
    if not 0 < mfu <= 1 or not 0 < hbm_efficiency <= 1:
        raise UserError(f"--mfu={mfu} and --hbm_efficiency={hbm_efficiency} must lie in (0, 1]")
    if num_devices < 1 or jax.device_count() < num_devices or jax.default_backend() != "cpu":
        raise UserError(f"--devices={num_devices}: the planner needs that many CPU devices (it sets XLA_FLAGS="
                        f"--xla_force_host_platform_device_count before jax starts; this process has "
                        f"{jax.device_count()} {jax.default_backend()} device(s): run it as its own process)")
    hf = _hf_config(config.model.path)
    devices = jax.devices()[:num_devices]
    workload = _workload(config, prompt_len, turns)
    attention = chip_attention(config, hf, chip)
    run = abstract_run(config, model_config_for(config, hf, chip), devices)
    depth = None if full_depth else "extrapolated"
    # A layout whose resident state alone overflows the chip needs no learner compiles to be told
    # so; its rollout's are still compiled, for the decode's share of the step time.
    parts = ("learner", "sampler") if run.resident_bytes <= chip.usable_bytes else ("sampler",)
    costs = (costs_at_depth(config, hf, chip, devices, workload, None, parts=parts, cache=cache) if full_depth
             else extrapolated_costs(config, hf, chip, devices, workload, parts=parts, cache=cache))
    # Decode has no inner loop: its per-token FLOPs are those of the decode program itself.
    flat = extrapolated_costs(config, hf, chip, devices, workload, flat=True, parts=("learner", "prefill"),
                              cache=cache)
    decode = next(c for c in costs if c.name == "decode")
    estimate = step_estimate(config, workload, flat, decode, chip, num_devices, mfu, hbm_efficiency)
    resident = run.resident_bytes
    peak = _peak(costs, resident)
    result = dict(
        model=os.path.basename(os.path.normpath(config.model.path)), chip=chip.name, devices=num_devices,
        usable_gib=chip.usable_bytes / GiB, mesh=[int(run.mesh.shape[a]) for a in ("data", "fsdp", "tensor")],
        micro_batch_size=int(config.algo.micro_batch_size), workload=dataclasses.asdict(workload),
        attention_on_chip=attention, compute_dtype=run.model_config.dtype, depth=depth or "full",
        parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(run.state.params["policy"])),
        trained_parameters=sum(math.prod(x.shape) for x in jax.tree.leaves(
            actor_critic.split_trainable(run.state.params)[0])),
        lora_rank=int(config.model.lora.rank),
        resident_gib=resident / GiB, peak_gib=peak / GiB, fits=peak <= chip.usable_bytes,
        programs={c.name: dict(argument_gib=c.argument / GiB, output_gib=c.output / GiB, alias_gib=c.alias / GiB,
                               temp_gib=c.temp / GiB, live_peak_gib=c.live_peak(resident) / GiB,
                               compile_s=c.compile_s) for c in costs},
        flops_per_step=estimate.flops, seconds_per_step=estimate.seconds, mfu=mfu, hbm_efficiency=hbm_efficiency,
        step_minutes=estimate.step_seconds / 60, run_hours=estimate.step_seconds * workload.total_steps / 3600)
    _print_plan(result, run, report)
    if run_search:
        report(f"searching for the smallest mesh of {chip.name} that fits (depth extrapolated from {DEPTHS[0]} "
               f"and {DEPTHS[1]} layers):")
        found = search(config, hf, chip, jax.devices()[:num_devices], workload, report, cache)
        result["smallest"] = None if found is None else dict(
            devices=math.prod(found.mesh_shape), mesh=list(found.mesh_shape),
            micro_batch_size=found.micro_batch_size, peak_gib=found.peak_bytes / GiB)
        report("smallest mesh that fits: " + ("none of up to %d devices" % num_devices if found is None else
               f"{math.prod(found.mesh_shape)} x {chip.name}, mesh {_mesh_text(found.mesh_shape)}, "
               f"micro-batch {found.micro_batch_size}, peak {found.peak_bytes / GiB:.1f} GiB"))
    report(CAVEAT)
    result["planner_seconds"] = time.perf_counter() - t_start
    report(f"planned in {result['planner_seconds']:.0f} s")
    return result


def _print_plan(result: dict[str, Any], run: AbstractRun, report: Callable[[str], None]) -> None:
    w = result["workload"]
    mesh = result["mesh"]
    report(f"epo-jax plan: {result['model']} ({result['parameters'] / 1e9:.2f} B parameters) on "
           f"{result['devices']} x {result['chip']} ({result['usable_gib']:.1f} GiB usable each)")
    report(f"layout: mesh {_mesh_text(mesh)}, micro-batch {result['micro_batch_size']} rows "
           f"({result['micro_batch_size'] // (mesh[0] * mesh[1])} per batch shard); update {w['update_rows']} rows "
           f"({w['samples']} turn samples) x ({w['prompt_len']} + {w['response_len']}) tokens; rollout "
           f"{w['environments']} rows x {w['turns']} turns")
    if result["lora_rank"]:
        report(f"LoRA rank {result['lora_rank']}: {result['trained_parameters']:,} trained parameters (adapters and "
               f"heads, with AdamW moments); the base frozen in {run.model_config.param_dtype} is the KL reference")
    report(f"numerics: compute {result['compute_dtype']}, params {run.model_config.param_dtype}, remat "
           f"{'on' if run.model_config.remat else 'off'}; attention on the chip: {result['attention_on_chip']} "
           "(compiled here: xla, whose score blocks bound a fused kernel's)")
    depth = ("the model's depth" if result["depth"] == "full"
             else f"extrapolated from {DEPTHS[0]} and {DEPTHS[1]} layers")
    report(f"per device, GiB ({depth})    arguments   outputs  (donated)  temporaries  live at peak")
    for name, p in result["programs"].items():
        report(f"  {name:<24} {p['argument_gib']:>10.2f} {p['output_gib']:>9.2f} {p['alias_gib']:>10.2f} "
               f"{p['temp_gib']:>12.2f} {p['live_peak_gib']:>13.2f}")
    if "update" not in result["programs"]:
        report("  update and score pass not compiled: the resident state alone overflows the chip")
    report(f"  resident train state + KL reference: {result['resident_gib']:.2f} GiB; peak {result['peak_gib']:.2f} "
           f"GiB of {result['usable_gib']:.1f}: {'fits' if result['fits'] else 'DOES NOT FIT'}")
    flops = result["flops_per_step"]
    report("FLOPs per RL step: " + ", ".join(f"{k} {v:.3g}" for k, v in flops.items())
           + f"; total {sum(flops.values()):.3g}")
    seconds = result["seconds_per_step"]
    report(f"step time at {result['mfu']:.0%} MFU (decode: the longer of its FLOPs and its reads of weights and "
           f"KV cache at {result['hbm_efficiency']:.0%} of HBM bandwidth): "
           + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
           + f"; {result['step_minutes']:.1f} min per step, {result['run_hours']:.1f} h for {w['total_steps']} steps "
           "(environment stepping and collectives not counted)")


def _simulate_devices(num_devices: int) -> None:
    """N host-platform CPU devices (before jax's backend starts), on the CPU platform."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(
        "--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={num_devices}"])
    jax.config.update("jax_platforms", "cpu")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}; set fields as --config.a.b=value.")
    try:
        if _CHIP.value not in CHIPS:
            raise UserError(f"--chip={_CHIP.value!r} is not one of {', '.join(CHIPS)}")
        if _DEVICES.value < 1:
            raise UserError(f"--devices={_DEVICES.value} must be >= 1")
        _simulate_devices(_DEVICES.value)
        config = config_lib.validate(flags.FLAGS.config)
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        result = plan(config, chip=CHIPS[_CHIP.value], num_devices=_DEVICES.value, prompt_len=_PROMPT_LEN.value,
                      turns=_TURNS.value, mfu=_MFU.value, hbm_efficiency=_HBM_EFFICIENCY.value,
                      full_depth=_FULL_DEPTH.value, run_search=_SEARCH.value, cache=CostCache(_CACHE.value))
        if _JSON.value:
            with open(_JSON.value, "w") as f:
                json.dump(result, f, indent=2)
    except UserError as error:
        run_main.exit_with(error, flags.FLAGS.verbose)


if __name__ == "__main__":
    app.run(main, flags_parser=run_main.parse_flags)
