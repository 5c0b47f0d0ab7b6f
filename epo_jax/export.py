"""Exports the policy of a training run as a Hugging Face folder.

    python -m epo_jax.export --workdir=runs/scienceworld --out=exported/ [--step=N] [--adapter]

The run's `config.json` (written by the trainer) names the base model (`model.path`; "" is the
embedded SmolLM2-135M-Instruct), which gives the architecture and the tokenizer. The policy
parameters of the latest checkpoint (or of `--step`) are read from `<workdir>/checkpoints`:
only `state.params["policy"]` is restored (not the optimizer moments, critic or history), onto
one host device. The folder written by `save_pretrained` loads in `transformers`
(`AutoModelForCausalLM.from_pretrained(out)`) and in epo-jax (`load_pretrained(out)`).

A LoRA run (model.lora.rank > 0) checkpoints its adapters only: they are restored and folded into
the base weights read again from model.path (W + (alpha / r) A B, `lora.merged`), so `--out` is
the same plain folder. With `--adapter` the folder is instead a PEFT adapter folder
(adapter_config.json + adapter_model.safetensors, and the tokenizer) that
`peft.PeftModel.from_pretrained(base, out)` loads on the base model.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
import safetensors.numpy
import transformers
from absl import app, flags, logging
from flax import nnx

from epo_jax.models import lora, transformer
from epo_jax.models.config import ModelConfig, from_hf_config
from epo_jax.models.loading import EMBEDDED_MODEL, load_pretrained, save_pretrained
from epo_jax.models.tokenizer import load_tokenizer

RUN_CONFIG_FILE = "config.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
CHECKPOINT_DIR = "checkpoints"
# TrainState fields holding the policy, as orbax names them in the saved tree.
POLICY_PATH = ("params", "policy")


def read_run_config(workdir: str) -> dict[str, Any]:
    """The run config the trainer wrote to `<workdir>/config.json`, as a dict."""
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"--workdir={workdir!r} is not a directory; pass the workdir of a training run.")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} is missing: the trainer writes it when a run starts; pass the workdir of a run "
            "started by `python -m epo_jax.main` (or `train_and_evaluate`).")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "model" not in config or "path" not in config["model"]:
        raise ValueError(f"{path!r} has no model.path field; it is not an epo-jax run config.")
    return config


def base_model(run_config: dict[str, Any]) -> tuple[ModelConfig, transformers.PreTrainedTokenizerBase]:
    """Architecture (with the run's param dtype) and tokenizer of the run's base model.

    A Hugging Face folder is read for its config.json and tokenizer only; a GGUF file (the embedded
    model included) holds both in its metadata and is loaded whole.
    """
    model = run_config["model"]
    path = model["path"]
    param_dtype = model.get("param_dtype", "float32")
    if path and os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"model.path={path!r} of the run has no config.json; restore the base "
                                    "model folder the run was trained from.")
        with open(config_path, encoding="utf-8") as f:
            config = from_hf_config(json.load(f), param_dtype=param_dtype)
        return config, load_tokenizer(path)
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"model.path={path!r} of the run does not exist; the export needs the base "
                                "model's architecture and tokenizer from it.")
    loaded = load_pretrained(path, param_dtype=param_dtype)
    return loaded.config, loaded.tokenizer


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    """The checkpoints of `<workdir>/checkpoints`, opened for restoring; raises if there are none."""
    directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoint in {workdir!r}: {directory!r} does not exist (the trainer saves "
                                "every checkpoint.every_steps steps).")
    # Opened without create (a missing step folder must not be made); nothing is ever saved through it.
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False),
                                    item_names=("state", "meta"))
    if manager.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {directory!r}: it holds no completed step folder.")
    return manager


def _key_name(key: Any) -> str:
    """A jax key-path entry as orbax names it in a saved tree (dict keys and layer indices as str)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unexpected pytree key {key!r}")


def _policy_target(abstract_params: nnx.State, sharding: jax.sharding.Sharding
                   ) -> tuple[dict[str, Any], list[tuple[str, ...]]]:
    """The restore target of `state.params["policy"]` as orbax saved it (nested dicts with str keys,
    each nnx Param as {"value": array}), and each leaf's path in it, in `abstract_params` leaf order."""
    target: dict[str, Any] = {}
    paths = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path = POLICY_PATH + tuple(_key_name(k) for k in key_path)
        node = target
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        paths.append(path)
    return target, paths


def restore_policy(manager: ocp.CheckpointManager, abstract_params: nnx.State, step: int | None = None,
                   device: jax.Device | None = None) -> tuple[nnx.State, int]:
    """(policy params, step) of a checkpoint: `state.params["policy"]` restored alone onto `device`
    (default: a host CPU device), whatever mesh the run saved it from.

    `abstract_params` (from `transformer.abstract_params`) gives the structure, shapes and dtypes;
    `step` None takes the latest checkpoint.
    """
    available = sorted(manager.all_steps())
    if step is None:
        step = manager.latest_step()
    elif step not in available:
        raise ValueError(f"--step={step} has no checkpoint in {manager.directory}; available steps: {available}.")
    sharding = jax.sharding.SingleDeviceSharding(device or _host_device())
    target, paths = _policy_target(abstract_params, sharding)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(
            f"The checkpoint of step {step} in {manager.directory} does not hold policy params of the run's "
            f"base model (shapes from its model.path): {error}") from error
    leaves = []
    for path in paths:
        node = restored.state
        for part in path:
            node = node[part]
        leaves.append(node)
    treedef = jax.tree_util.tree_structure(abstract_params)
    return jax.tree.unflatten(treedef, leaves), int(step)


def _host_device() -> jax.Device:
    """A CPU device when the CPU backend is up (exporting is host work), else the first device."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return jax.local_devices()[0]


def lora_spec(run_config: dict[str, Any]) -> lora.LoraSpec | None:
    """The adapters' spec of a LoRA run (None for full fine-tuning, or a config older than LoRA)."""
    model = run_config["model"]
    settings = model.get("lora") or {}
    if not settings.get("rank"):
        return None
    return lora.LoraSpec(rank=int(settings["rank"]), alpha=float(settings["alpha"]),
                         targets=tuple(settings["targets"]), param_dtype=model.get("param_dtype", "float32"))


def _restore_adapters(manager: ocp.CheckpointManager, run_config: dict[str, Any], spec: lora.LoraSpec,
                      step: int | None):
    """(base model as loaded, graphdef with adapters, base + checkpointed adapters, step)."""
    base = load_pretrained(run_config["model"]["path"], param_dtype=run_config["model"]["lora"]["base_dtype"])
    graphdef, abstract = lora.abstract_with_adapters(base.config, spec)
    adapters, step = restore_policy(manager, lora.adapter_params(abstract), step)
    return base, graphdef, nnx.merge_state(base.params, adapters), step


def _write_peft_folder(params: nnx.State, spec: lora.LoraSpec, base_path: str, tokenizer, out: str) -> None:
    """PEFT's adapter folder: adapter_config.json naming the base, adapter_model.safetensors, the tokenizer."""
    os.makedirs(out, exist_ok=True)
    base_name = os.path.abspath(base_path) if base_path else EMBEDDED_MODEL
    with open(os.path.join(out, PEFT_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(lora.peft_config(spec, base_name), f, indent=2)
    safetensors.numpy.save_file(lora.peft_tensors(params), os.path.join(out, PEFT_WEIGHTS_FILE),
                                metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


def export(workdir: str, out: str, step: int | None = None, adapter: bool = False) -> int:
    """Writes the policy of `workdir`'s checkpoint (latest, or `step`) to the Hugging Face folder `out`
    (merged weights), or with `adapter` a LoRA run's adapters to the PEFT adapter folder `out`;
    returns the exported step."""
    run_config = read_run_config(workdir)
    spec = lora_spec(run_config)
    if adapter and spec is None:
        raise ValueError(f"--adapter exports LoRA adapters, but the run in {workdir!r} fine-tuned all weights "
                         "(model.lora.rank = 0); export it without --adapter.")
    manager = checkpoint_manager(workdir)
    try:
        if spec is None:
            model_config, tokenizer = base_model(run_config)
            _, abstract = transformer.abstract_params(model_config)
            params, step = restore_policy(manager, abstract, step)
        else:
            base, graphdef, adapted, step = _restore_adapters(manager, run_config, spec, step)
            model_config, tokenizer = base.config, base.tokenizer
    finally:
        manager.close()
    if spec is None:
        save_pretrained(params, model_config, tokenizer, out)
    elif adapter:
        _write_peft_folder(adapted, spec, run_config["model"]["path"], tokenizer, out)
    else:
        save_pretrained(lora.merged(graphdef, adapted)[1], model_config, tokenizer, out)
    return step


_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory of a training run (holds config.json and "
                               "checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Folder to write the Hugging Face model into.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; the latest when unset.")
_ADAPTER = flags.DEFINE_boolean("adapter", False, "For a LoRA run: write a PEFT adapter folder (adapter_config.json "
                                "+ adapter_model.safetensors) instead of the merged weights.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}; use --workdir, --out, --step and --adapter.")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every restore detail at INFO
        logging.set_verbosity(logging.WARNING)
    step = export(_WORKDIR.value, _OUT.value, _STEP.value, adapter=_ADAPTER.value)
    what = "LoRA adapters" if _ADAPTER.value else "policy"
    print(f"Exported the {what} of step {step} of {_WORKDIR.value} to {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
