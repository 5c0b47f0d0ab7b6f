"""A miniature reproduction of EPO's claims on the toy key-and-door corridor, in one command.

    python bench/reproduce_mini.py                 # build the policy, run the sweep, write the report
    python bench/reproduce_mini.py --quick         # smoke run: tiny budget, one method, one seed
    python bench/reproduce_mini.py --report-only   # rewrite the report from finished runs

What it does, through the same code paths as a full run:

1. Policy. A word-level tokenizer over every word the corridor and its prompt can produce
   (`tokenizers` WordLevel -> transformers.PreTrainedTokenizerFast, with a chat template, an
   eos token and the reply tags as tokens of their own), and a tiny Llama-architecture
   transformer from `epo_jax.models.transformer`. It is warm-started by a short supervised
   run so that it answers in the format "<think> </think> <action> COMMAND </action>" with a
   weak prior: first on the expert's replies, then on replies that name the expert's next
   command with probability `--prior` and a uniformly random command otherwise (soft targets),
   which leaves a policy that solves a few percent of the episodes, the way an
   instruction-tuned LLM starts on an agent task.
   It is saved with `epo_jax.models.loading.save_pretrained` (nothing is downloaded).
2. Sweep. For every method and seed, `python -m epo_jax.main --config=configs/mini.py` with
   the method's overrides, at most `--parallel` (2) at a time, sharing JAX's persistent
   compilation cache. A run whose metrics.jsonl already reaches its last step is reused.
3. Report. `epo_jax.report` (the module behind `python -m epo_jax.report`) reads every run's
   config.json, metrics.jsonl and eval_panel.json and gives the tables and the PNG figures
   (docs/results/): Succ.* and Succ. per split with the spread over seeds and bootstrap
   intervals, per-task success, training success and the policy entropy with its variance
   across steps, and the paper's Table 1 for context; this script adds the setup and checks
   each of the paper's claims with the bootstrap interval of the difference between methods.

Output folder (default runs/mini): policy/ (the warm-started model), runs/<method>/seed<k>/
(each run's work directory and log.txt), sweep.json (timing).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import runpy
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from epo_jax import report  # noqa: E402
from epo_jax.envs import toy_keydoor  # noqa: E402
from epo_jax.rollout import prompts as prompts_lib  # noqa: E402
from epo_jax.train.metrics import read_jsonl  # noqa: E402

ENV_NAME = "toy_keydoor"
THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE = "<think>", "</think>", "<action>", "</action>"
PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
ROLE_TOKENS = ("<system>", "<user>", "<assistant>")
CHAT_TEMPLATE = ("{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} <eos> "
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    overrides: tuple[str, ...]


METHODS = (
    Method("ppo", "PPO", ("algo.advantage=ppo_gae", "algo.entropy_control=none")),
    Method("ppo_bonus", "PPO + entropy bonus", ("algo.advantage=ppo_gae", "algo.entropy_control=bonus")),
    Method("ppo_epo", "PPO + EPO", ("algo.advantage=ppo_gae", "algo.entropy_control=epo",
                                    "epo.mode=paper")),
    Method("ppo_epo_base", "PPO + EPO-Base (no smoothing)", ("algo.advantage=ppo_gae",
                                                              "algo.entropy_control=epo",
                                                              "epo.mode=paper", "epo.smoothing=False")),
    Method("ppo_epo_code", "PPO + EPO (code mode)", ("algo.advantage=ppo_gae", "algo.entropy_control=epo",
                                                     "epo.mode=code")),
    Method("grpo", "GRPO", ("algo.advantage=grpo", "algo.entropy_control=none")),
    Method("grpo_epo", "GRPO + EPO", ("algo.advantage=grpo", "algo.entropy_control=epo", "epo.mode=paper")),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}

# --- Tokenizer and policy -------------------------------------------------------------------

def corpus_texts(seed: int = 0) -> list[str]:
    """Every kind of text a prompt can hold: task descriptions and observations of all splits
    (random and expert play from every episode), the prompt's fixed text, and the commands."""
    rng = np.random.default_rng(seed)
    texts = list(toy_keydoor.COMMANDS)
    for split in toy_keydoor.SPLITS:
        for spec in toy_keydoor.episodes(split):
            env = toy_keydoor.ToyKeyDoorEnv(spec.task, spec.variation)
            for mix in (0.0, 0.5, 1.0):
                observation, info = env.reset()
                texts += [observation, info["task_description"]]
                for _ in range(25):
                    plan = env.expert_plan()
                    command = (plan[0] if rng.random() < mix
                               else toy_keydoor.COMMANDS[rng.integers(len(toy_keydoor.COMMANDS))])
                    observation, _, done, _ = env.step(command)
                    texts.append(observation)
                    if done:
                        break
    history = [prompts_lib.Turn("observation", "go east")] * 4
    texts.append(prompts_lib.user_message(ENV_NAME, task_description="task", observation="observation",
                                          history=history, history_length=2))
    texts.append("nothing happens")
    return texts


def build_tokenizer(texts: Sequence[str]):
    """A lower-casing word-level tokenizer over the words of `texts`, with the chat template."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    splitter = pre_tokenizers.Whitespace()
    words = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text.lower())})
    specials = [PAD, UNK, EOS, *ROLE_TOKENS]
    tags = [THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE]
    vocab = {token: i for i, token in enumerate(specials + tags + [w for w in words if w not in specials + tags])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = splitter
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    # The reply tags are ordinary (non-special) tokens: decoding keeps them, so the action
    # parser sees them, and "</action>" is one token the sampler's stop string matches.
    backend.add_tokens([AddedToken(t, normalized=False) for t in tags])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def reply(command: str) -> str:
    return f"{THINK_OPEN} {THINK_CLOSE} {ACTION_OPEN} {command} {ACTION_CLOSE}"


def prompt_ids(tokenizer, info: dict[str, Any], observation: str) -> list[int]:
    """The prompt exactly as the agent loop renders it (no history, no action list)."""
    text = prompts_lib.build_prompt(tokenizer, ENV_NAME, info, observation, (), history_length=0,
                                    show_actions=False)
    return tokenizer.encode(text, add_special_tokens=False)


def command_distribution(expert: str, prior: float) -> dict[str, float]:
    """The warm start's target policy: the expert's command with probability `prior`, else a
    uniformly random command."""
    commands = toy_keydoor.COMMANDS
    return {c: (1.0 - prior) / len(commands) + (prior if c == expert else 0.0) for c in commands}


def warm_start_examples(tokenizer, num_examples: int, prior: float, seed: int):
    """(prompt ids, reply ids, reply targets) from states of train episodes.

    The reply names a command drawn from `command_distribution`; its targets are the
    distributions the model should put on each reply token: one-hot for the tags and for the
    second word of "take key" / "open door", the target policy's marginal over first words at
    the first command token, and its conditional over directions after "go". Soft targets
    give the exact gradient of the cross-entropy to the target policy for the command words
    (a sampled label alone is mostly noise when `prior` is small).
    """
    rng = np.random.default_rng(seed)
    specs = toy_keydoor.episodes("train")
    commands = toy_keydoor.COMMANDS
    vocab = len(tokenizer)
    first_ids = {c: tokenizer.encode(c, add_special_tokens=False) for c in commands}
    action_open = tokenizer.convert_tokens_to_ids(ACTION_OPEN)
    examples = []
    while len(examples) < num_examples:
        spec = specs[rng.integers(len(specs))]
        env = toy_keydoor.ToyKeyDoorEnv(spec.task, spec.variation)
        observation, info = env.reset()
        for _ in range(int(rng.integers(1, 20))):  # visit states of every stage of the task
            expert = env.expert_plan()[0]
            dist = command_distribution(expert, prior)
            label = commands[rng.choice(len(commands), p=[dist[c] for c in commands])]
            reply_ids = tokenizer.encode(reply(label), add_special_tokens=False)
            targets = np.zeros((len(reply_ids), vocab), np.float32)
            targets[np.arange(len(reply_ids)), reply_ids] = 1.0
            first = reply_ids.index(action_open) + 1
            targets[first] = 0.0
            for c, p in dist.items():
                targets[first, first_ids[c][0]] += p
            label_ids = first_ids[label]
            if len(label_ids) == 2:
                same_first = {c: p for c, p in dist.items() if first_ids[c][0] == label_ids[0]}
                targets[first + 1] = 0.0
                for c, p in same_first.items():
                    targets[first + 1, first_ids[c][1]] += p / sum(same_first.values())
            examples.append((prompt_ids(tokenizer, info, observation), reply_ids, targets))
            step = expert if rng.random() < 0.6 else commands[rng.integers(len(commands))]
            observation, _, done, info = env.step(step)
            if done:
                break
    return examples[:num_examples]


def _example_arrays(examples, prompt_len: int, reply_len: int, vocab: int):
    """tokens [N, P + R] (left-padded prompt, right-padded reply, as in training), attention
    mask, and reply targets [N, R, V] (all-zero rows at reply padding)."""
    n = len(examples)
    tokens = np.zeros((n, prompt_len + reply_len), np.int32)
    mask = np.zeros((n, prompt_len + reply_len), bool)
    targets = np.zeros((n, reply_len, vocab), np.float32)
    for i, (p, r, t) in enumerate(examples):
        start = prompt_len - len(p)
        tokens[i, start:prompt_len] = p
        tokens[i, prompt_len:prompt_len + len(r)] = r
        mask[i, start:prompt_len + len(r)] = True
        targets[i, :len(r)] = t
    return tokens, mask, targets


def probe_prior(graphdef, params, tokenizer, num_states: int = 200, seed: int = 7) -> dict[str, float]:
    """How the policy splits its probability over the 8 commands in IID states: the mean
    probability of the expert's command (the target is prior + (1 - prior) / 8) and how often
    the expert's command is the most probable one."""
    import jax
    import jax.numpy as jnp

    from epo_jax.models import transformer

    rng = np.random.default_rng(seed)
    specs = toy_keydoor.episodes("iid")
    commands = toy_keydoor.COMMANDS
    rows, experts = [], []
    while len(experts) < num_states:
        spec = specs[rng.integers(len(specs))]
        env = toy_keydoor.ToyKeyDoorEnv(spec.task, spec.variation)
        observation, info = env.reset()
        done = False
        for _ in range(int(rng.integers(0, 14))):
            observation, _, done, info = env.step(env.expert_plan()[0] if rng.random() < 0.7 else "wait")
            if done:
                break
        if done:
            continue
        experts.append(commands.index(env.expert_plan()[0]))
        prompt = prompt_ids(tokenizer, info, observation)
        rows += [(prompt, tokenizer.encode(reply(c), add_special_tokens=False)) for c in commands]
    prompt_len = max(len(p) for p, _ in rows)
    reply_len = max(len(r) for _, r in rows)
    weights = np.zeros((len(rows), reply_len), np.float32)
    for i, (_, r) in enumerate(rows):
        weights[i, :len(r)] = 1.0
    tokens, mask, _ = _example_arrays([(p, r, np.zeros((len(r), 1))) for p, r in rows], prompt_len, reply_len, 1)
    hidden = transformer.hidden_states(graphdef, params, jnp.asarray(tokens), None, jnp.asarray(mask))
    logits = jnp.einsum("btd,vd->btv", hidden[:, prompt_len - 1:-1], transformer.unembedding(params))
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tokens[:, prompt_len:, None]), -1)[..., 0]
    probs = np.exp(np.sum(np.asarray(logp) * weights, axis=1)).reshape(len(experts), len(commands))
    expert_p = probs[np.arange(len(experts)), experts]
    return {"probe_p_expert": float(expert_p.mean()),
            "probe_argmax_is_expert": float(np.mean(probs.argmax(axis=1) == np.asarray(experts))),
            "probe_p_commands": float(probs.sum(axis=1).mean())}


def _cosine_lr(step: int, steps: int, peak: float, final: float) -> float:
    """Linear warmup over the first tenth of `steps`, then cosine decay from `peak` to `final`."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_policy(out_dir: pathlib.Path, *, prior: float, num_examples: int, cycle_steps: int,
                 max_cycles: int, mixture_steps: int, seed: int = 0, batch_size: int = 64,
                 lr: float = 1e-2, converged_loss: float = 0.03) -> dict[str, Any]:
    """Builds the tokenizer and the warm-started tiny transformer into `out_dir`; returns a summary.

    Two supervised phases. First the expert's replies alone (sharp targets teach which words of
    the prompt decide the command), in cycles of `cycle_steps` steps (each with its own warmup and
    cosine decay: a restart gets the optimisation out of the plateaus this small model sometimes
    sits on) until the loss of a cycle's last steps is below `converged_loss`, at most
    `max_cycles` cycles. Then `mixture_steps` steps on the weak-prior mixture (see
    `warm_start_examples`) at a third of the rate, which flattens the replies the policy ends
    with while keeping what the first phase taught."""
    import jax
    import jax.numpy as jnp
    import optax

    from epo_jax.models import transformer
    from epo_jax.models.config import ModelConfig
    from epo_jax.models.loading import save_pretrained

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(corpus_texts(seed))
    config = ModelConfig(model_type="llama", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=4,
                         head_dim=16, tie_word_embeddings=True, rope_theta=10000.0,
                         max_position_embeddings=256, eos_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id)
    graphdef, params = transformer.init_params(config, jax.random.key(seed))

    expert_examples = warm_start_examples(tokenizer, num_examples // 2, 1.0, seed + 2)
    examples = warm_start_examples(tokenizer, num_examples, prior, seed)
    prompt_len = max(len(p) for p, _, _ in examples + expert_examples)
    reply_len = max(len(r) for _, r, _ in examples + expert_examples)
    expert_arrays = _example_arrays(expert_examples, prompt_len, reply_len, len(tokenizer))
    mixture_arrays = _example_arrays(examples, prompt_len, reply_len, len(tokenizer))

    def loss_fn(params, tokens, mask, targets):
        hidden = transformer.hidden_states(graphdef, params, tokens, None, mask)
        # Position t predicts token t + 1: the reply's predictions start at the last prompt token.
        reply_hidden = hidden[:, prompt_len - 1:-1]
        logits = jnp.einsum("btd,vd->btv", reply_hidden, transformer.unembedding(params))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.sum(targets * logp) / jnp.sum(targets)

    optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=0.01)

    @jax.jit
    def train_step(params, opt_state, learning_rate, tokens, mask, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, targets)
        opt_state.hyperparams["learning_rate"] = learning_rate
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed + 1)

    def run(params, arrays, steps, peak, final):
        opt_state = optimizer.init(params)
        losses = []
        for step in range(steps):
            idx = rng.integers(len(arrays[0]), size=batch_size)
            params, opt_state, loss = train_step(params, opt_state, jnp.float32(_cosine_lr(step, steps, peak, final)),
                                                 *(a[idx] for a in arrays))
            losses.append(float(loss))
        return params, float(np.mean(losses[-max(1, steps // 10):]))

    expert_losses = []
    for _ in range(max_cycles):
        params, loss = run(params, expert_arrays, cycle_steps, lr, lr * 0.1)
        expert_losses.append(loss)
        if loss < converged_loss:
            break
    params, final_loss = run(params, mixture_arrays, mixture_steps, lr / 3, lr * 0.03)
    probe = probe_prior(graphdef, params, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_pretrained(params, config, tokenizer, str(out_dir))
    targets = mixture_arrays[2]
    # The loss of a model that matches every target exactly (the targets' entropy).
    floor = float(-np.sum(targets * np.log(np.where(targets > 0, targets, 1.0))) / np.sum(targets))
    summary = {"vocab_size": len(tokenizer), "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
               "prior": prior, "examples": len(examples), "prompt_tokens_max": prompt_len,
               "reply_tokens": reply_len, "expert_steps": cycle_steps * len(expert_losses),
               "expert_cycle_losses": expert_losses, "mixture_steps": mixture_steps,
               "train_steps": cycle_steps * len(expert_losses) + mixture_steps,
               "final_loss": final_loss, "loss_floor": floor, **probe,
               "seconds": time.perf_counter() - t0}
    (out_dir / "warm_start.json").write_text(json.dumps(summary, indent=2))
    return summary


# --- Sweep ----------------------------------------------------------------------------------

def run_dir(out: pathlib.Path, method: str, seed: int) -> pathlib.Path:
    return out / "runs" / method / f"seed{seed}"


def finished(workdir: pathlib.Path, total_steps: int) -> bool:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return False
    records = read_jsonl(str(path))
    return bool(records) and records[-1]["step"] >= total_steps


def run_command(config_arg: str, workdir: pathlib.Path, policy_dir: pathlib.Path, seed: int,
                method: Method, total_steps: int) -> list[str]:
    return [sys.executable, "-m", "epo_jax.main", f"--config=configs/mini.py{config_arg}",
            f"--config.workdir={workdir}", f"--config.model.path={policy_dir}", f"--config.seed={seed}",
            f"--config.train.total_steps={total_steps}", f"--config.epo.code_total_epochs={total_steps}",
            *(f"--config.{o}" for o in method.overrides)]


def run_environment(cache_dir: pathlib.Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1"
                     + ("" if threads > 1 else " --xla_cpu_multi_thread_eigen=false"
                        " intra_op_parallelism_threads=1"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
    })
    return env


def sweep(out: pathlib.Path, methods: Sequence[Method], seeds: Sequence[int], config_arg: str,
          total_steps: int, parallel: int, threads: int) -> dict[str, Any]:
    """Runs every (method, seed) not finished yet, `parallel` at a time; returns timings."""
    policy_dir = out / "policy"
    env = run_environment(out / "jax_cache", threads)
    queue = [(m, s) for s in seeds for m in methods]
    running: list[tuple[Method, int, subprocess.Popen, float, Any]] = []
    timings: dict[str, float] = {}
    failures = []
    t0 = time.perf_counter()
    while queue or running:
        while queue and len(running) < parallel:
            method, seed = queue.pop(0)
            workdir = run_dir(out, method.name, seed)
            if finished(workdir, total_steps):
                print(f"[reuse] {method.name} seed {seed}", flush=True)
                continue
            workdir.mkdir(parents=True, exist_ok=True)
            log = open(workdir / "log.txt", "a")
            command = run_command(config_arg, workdir, policy_dir, seed, method, total_steps)
            log.write(" ".join(command) + "\n")
            log.flush()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"[start] {method.name} seed {seed} (pid {proc.pid})", flush=True)
            running.append((method, seed, proc, time.perf_counter(), log))
        time.sleep(0.5)
        for item in list(running):
            method, seed, proc, started, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            elapsed = time.perf_counter() - started
            timings[f"{method.name}/seed{seed}"] = elapsed
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
            print(f"[{status}] {method.name} seed {seed} in {elapsed:.0f} s", flush=True)
            if proc.returncode != 0:
                failures.append(f"{method.name}/seed{seed}")
    return {"wall_s": time.perf_counter() - t0, "run_s": timings, "failures": failures}


# --- Report (through epo_jax.report) --------------------------------------------------------

# Succ.'s window: the last quarter of the 40 steps, i.e. the evaluations at steps 30 and 40 (with
# evaluations every 10 steps, the last 20% would hold the final evaluation alone).
WINDOW = "last:0.25"


def _shown_path(path: pathlib.Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_groups(out: pathlib.Path, methods: Sequence[Method], seeds: Sequence[int]):
    """(groups labelled and ordered as `methods`, runs left out because they stopped early)."""
    # Relative to the checkout where they lie in it, so that the report names no machine's folders.
    paths = [_shown_path(run_dir(out, m.name, s)) for m in methods for s in seeds
             if (run_dir(out, m.name, s) / "metrics.jsonl").exists()]
    runs, left_out = report.select_complete([report.load_run(p) for p in paths])
    groups = report.group_runs(runs)
    order = {m.name: i for i, m in enumerate(methods)}
    for group in groups:
        names = {pathlib.Path(r.path).parent.name for r in group.runs}
        if len(names) != 1:
            raise RuntimeError(f"methods {sorted(names)} ran the same config; give each method its own overrides")
        group.label = METHODS_BY_NAME[names.pop()].label
    groups.sort(key=lambda g: order[pathlib.Path(g.runs[0].path).parent.name])
    return groups, left_out


def setup_text(total_steps: int, policy_info: dict[str, Any], config_arg: str) -> str:
    """The report's Setup section: the task, the policy and the budget, from the config and the warm start."""
    mini = runpy.run_path(str(ROOT / "configs" / "mini.py"))["get_config"](config_arg.lstrip(":"))
    prior = float(policy_info.get("prior", math.nan))
    target_p = prior + (1 - prior) / len(toy_keydoor.COMMANDS)
    turns = {split: [toy_keydoor.layout(*spec).optimal_turns for spec in toy_keydoor.episodes(split)]
             for split in ("train", "ood")}
    return f"""## Setup

- **Task** (`epo_jax/envs/toy_keydoor.py`): a corridor of n rooms with a locked door at one
  end; the agent must walk to the key, take it, walk to the door, open it and go through. The
  only reward is {mini.env.success_reward:g} on success. Every episode needs at least
  {toy_keydoor.MIN_OPTIMAL_TURNS} turns ({min(turns['train'])}-{max(turns['train'])} in training,
  {min(turns['ood'])}-{max(turns['ood'])} in OOD). Train and IID: corridors of 5-7 rooms (IID =
  held-out variations, whose layouts mostly also occur in training); OOD: unseen lengths 8-9.
  The turn limit is {mini.env.max_turns}; text that is no command does nothing.
- **Policy**: a {policy_info.get('num_params', 0) / 1e3:.0f}k-parameter Llama-architecture transformer
  (`epo_jax.models.transformer`, 2 layers, width 64) with a {policy_info.get('vocab_size', '?')}-word
  tokenizer, warm-started ({policy_info.get('train_steps', '?')} supervised steps) to reply
  "<think> </think> <action> COMMAND </action>" with a weak prior: its training replies named the
  expert's command with probability {policy_info.get('prior', '?')} and a random one of 8 commands
  otherwise (the first {policy_info.get('expert_steps', '?')} steps on the expert's replies alone). In
  IID states the warm-started policy puts {policy_info.get('probe_p_expert', math.nan):.2f} of its
  probability on the expert's command on average (the target mixture: {target_p:.2f}) and ranks it
  first in {policy_info.get('probe_argmax_is_expert', math.nan) * 100:.0f}% of them. Prompts are at
  most {policy_info.get('prompt_tokens_max', '?')} tokens.
- **Budget**, identical for every method: {total_steps} RL steps of {mini.env.num_groups} groups x
  {mini.env.group_size} environments, replies of at most {mini.rollout.max_response_len} tokens at
  temperature {mini.rollout.temperature:g}, AdamW lr {mini.optim.lr:g} (value head {mini.optim.critic_lr:g}),
  1 PPO epoch of {mini.algo.num_minibatches} minibatches, KL {mini.algo.kl_coef:g}; evaluation every
  {mini.eval.every_steps} steps at temperature {mini.eval.temperature:g} on the fixed panels of
  {mini.eval.num_episodes} IID and {mini.eval.num_episodes} OOD episodes (`epo_jax/envs/panels.py`: tasks
  stratified, episodes in SHA-256 order; the lists are docs/panels/toy_keydoor_{mini.eval.num_episodes}.json),
  the same for every method and seed. EPO keeps the paper's values (lambda {mini.epo.lam:g}, kappa
  ({mini.epo.kappa_l:g}, {mini.epo.kappa_r:g}), gamma {mini.epo.gamma:g}, alpha {mini.epo.alpha:g});
  the entropy bonus uses coefficient {mini.algo.entropy_coef:g}. Seeds change the order of
  training episodes and every sample drawn; the warm-started policy is the same for all runs.
"""


def write_report(path: pathlib.Path, fig_dir: pathlib.Path, figures: Sequence[str], groups, summaries,
                 left_out, total_steps: int, policy_info: dict[str, Any], timing: dict[str, Any] | None,
                 config_arg: str) -> None:
    wall = ""
    if timing:
        wall = (f"The sweep took {timing['wall_s'] / 60:.1f} min of wall time "
                f"({len(timing['run_s'])} runs started, {timing.get('parallel', 2)} at a time"
                f"{'; failed: ' + ', '.join(timing['failures']) if timing['failures'] else ''}), "
                f"measured {timing.get('finished_at', '')}.")
    body = report.markdown(groups, summaries, report.parse_window(WINDOW), published="all", figures=figures,
                           figures_rel=os.path.relpath(fig_dir, path.parent), left_out=left_out)
    text = (f"# EPO in miniature: the toy key-and-door corridor\n\n"
            f"Produced by `python bench/reproduce_mini.py{' --quick' if config_arg == ':quick' else ''}` "
            f"(configs/mini.py{config_arg}) through `epo_jax.report`. Every number below is read from the "
            f"runs' `metrics.jsonl`; nothing is edited by hand.\n{wall}\n\n"
            + setup_text(total_steps, policy_info, config_arg) + "\n" + body
            + "\n## What happened\n\n" + observations_text(summaries) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _values(summary: report.Summary, metric: str) -> list[float]:
    """A metric's per-seed values: "iid/succ" (split/metric) or a scalar name ("entropy_var")."""
    split, _, name = metric.rpartition("/")
    stat = summary.splits.get(split, {}).get(name) if split else summary.stats.get(name)
    return stat.values if stat else []


def _claim(by_label, title: str, a: str, b: str, metric: str, scale: float, unit: str, better: str) -> str | None:
    """One of the paper's claims as "b minus a" with the bootstrap 95% interval of that difference."""
    if a not in by_label or b not in by_label:
        return None
    va, vb = _values(by_label[a], metric), _values(by_label[b], metric)
    if not va or not vb:
        return None
    diff = float(np.mean(vb) - np.mean(va))
    low, high = report.bootstrap_diff_ci(va, vb)
    noise = ("the interval excludes 0" if low > 0 or high < 0 else "the interval includes 0: within the seed noise")
    held = diff != 0 and (diff > 0) == (better == "higher")
    digits = 1 if scale == 100 else 2  # points of success; entropy variances in units of 1e-3
    return (f"- {title}: {b} minus {a} = {diff * scale:+.{digits}f}{unit} (95% interval "
            f"[{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]; {noise}); "
            f"{'in' if held else 'not in'} the direction the paper reports.")


CLAIMS = (  # (title, baseline, method, metric, scale, unit, which way the paper says it goes)
    ("EPO raises PPO's Succ. (IID)", "PPO", "PPO + EPO", "iid/succ", 100, " points", "higher"),
    ("EPO raises PPO's Succ. (OOD)", "PPO", "PPO + EPO", "ood/succ", 100, " points", "higher"),
    ("EPO raises PPO's Succ.* (IID)", "PPO", "PPO + EPO", "iid/succ_star", 100, " points", "higher"),
    ("EPO raises GRPO's Succ. (IID)", "GRPO", "GRPO + EPO", "iid/succ", 100, " points", "higher"),
    ("EPO raises GRPO's Succ. (OOD)", "GRPO", "GRPO + EPO", "ood/succ", 100, " points", "higher"),
    ("EPO-Base (no smoothing) plateaus lower than EPO: late training success", "PPO + EPO-Base (no smoothing)",
     "PPO + EPO", "train_last", 100, " points", "higher"),
    ("EPO-Base plateaus lower than EPO: Succ. (IID)", "PPO + EPO-Base (no smoothing)", "PPO + EPO", "iid/succ",
     100, " points", "higher"),
    ("EPO lowers the variance of the entropy across steps (against PPO)", "PPO", "PPO + EPO", "entropy_var",
     1e3, "e-3", "lower"),
    ("EPO lowers the variance of the entropy across steps (against GRPO)", "GRPO", "GRPO + EPO", "entropy_var",
     1e3, "e-3", "lower"),
    ("Smoothing lowers the variance of the entropy (EPO against EPO-Base)", "PPO + EPO-Base (no smoothing)",
     "PPO + EPO", "entropy_var", 1e3, "e-3", "lower"),
    ("EPO against a plain entropy bonus: Succ. (IID)", "PPO + entropy bonus", "PPO + EPO", "iid/succ", 100,
     " points", "higher"),
)


def observations_text(summaries: Sequence[report.Summary]) -> str:
    """The report's last section: each method in numbers, then each of the paper's claims checked
    against this sweep, in words generated from the numbers."""
    by_label = {s.label: s for s in summaries}
    lines = ["Per method (means over seeds):", ""]
    for s in summaries:
        mean = {k: v.mean for k, v in s.stats.items()}
        v1, v2 = mean["entropy_var_first_half"], mean["entropy_var_second_half"]
        succ = ", ".join(f"{split.upper()} {st['succ'].mean * 100:.1f}%" for split, st in s.splits.items())
        lines.append(f"- {s.label}: Succ. {succ}; training success {mean['train_first'] * 100:.1f}% in the first "
                     f"quarter of the steps and {mean['train_last'] * 100:.1f}% in the last; entropy "
                     f"{mean['entropy_first']:.3f} at the first step and {mean['entropy_last']:.3f} at the last; "
                     f"the variance of the entropy {'fell' if v2 < v1 else 'rose'} from the first half of the run "
                     f"({v1 * 1e3:.2f}e-3) to the second ({v2 * 1e3:.2f}e-3).")
    lines += ["", "The paper's claims, checked on this toy task (differences of means over seeds, with the "
              "bootstrap 95% interval of the difference, each method's seeds resampled on their own):", ""]
    lines += [line for claim in CLAIMS if (line := _claim(by_label, *claim))]
    for label in ("PPO + EPO", "GRPO + EPO"):
        if label in by_label:
            v1 = by_label[label].stats["entropy_var_first_half"].mean
            v2 = by_label[label].stats["entropy_var_second_half"].mean
            lines.append(f"- Under {label} the entropy's variance {'decreased' if v2 < v1 else 'did not decrease'} "
                         f"from the first half of training to the second ({v1 * 1e3:.2f}e-3 → {v2 * 1e3:.2f}e-3).")
    code, base = by_label.get("PPO + EPO (code mode)"), by_label.get("PPO + EPO-Base (no smoothing)")
    if code and base:
        same = all(_values(code, m) == _values(base, m) for m in ("iid/succ", "ood/succ", "train_last", "entropy_var"))
        lines.append("- Code mode " + ("matches EPO-Base (no smoothing) exactly" if same else
                                       "differs from EPO-Base (no smoothing)")
                     + ". The official code's smoothing penalty is an indicator {0, alpha} without gradient, "
                     "so beta times it changes the loss value but not the update; with the same entropy "
                     "aggregation the two make the same updates.")
    lines.append("- Not tested here: the constant phase weight (epo.beta_schedule=constant), which the paper says "
                 "converges more slowly early on.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mini", help="folder of the policy and the runs")
    parser.add_argument("--results", default="docs/results.md", help="the report to write")
    parser.add_argument("--figures", default="docs/results", help="folder of the report's PNG figures")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: configs/mini.py:quick, a short warm start, one method, one seed")
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS_BY_NAME)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the config's)")
    parser.add_argument("--parallel", type=int, default=2, help="training processes at a time")
    parser.add_argument("--threads", type=int, default=1,
                        help="XLA threads per training process (1: single-threaded)")
    parser.add_argument("--prior", type=float, default=0.3,
                        help="warm start: probability that a training reply names the expert's command")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report")
    args = parser.parse_args(argv)

    os.chdir(ROOT)
    out = pathlib.Path(args.out).resolve()
    config_arg = ":quick" if args.quick else ""
    mini = runpy.run_path(str(ROOT / "configs" / "mini.py"))["get_config"](config_arg.lstrip(":"))
    total_steps = args.steps or mini.train.total_steps
    names = args.methods or (["ppo_epo"] if args.quick else list(METHODS_BY_NAME))
    unknown = [n for n in names if n not in METHODS_BY_NAME]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS_BY_NAME)}")
    methods = [METHODS_BY_NAME[n] for n in names]
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))

    policy_dir = out / "policy"
    info_path = policy_dir / "warm_start.json"
    if not args.report_only and not info_path.exists():
        print("building the warm-started policy ...", flush=True)
        sizes = (dict(num_examples=2048, cycle_steps=20, max_cycles=1, mixture_steps=20) if args.quick
                 else dict(num_examples=16384, cycle_steps=200, max_cycles=8, mixture_steps=300))
        summary = build_policy(policy_dir, prior=args.prior, **sizes)
        print(json.dumps(summary), flush=True)
    policy_info = json.loads(info_path.read_text()) if info_path.exists() else {}

    timing_path = out / "sweep.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    if not args.report_only:
        timing = sweep(out, methods, seeds, config_arg, total_steps, args.parallel, args.threads)
        timing.update(parallel=args.parallel, threads=args.threads,
                      finished_at=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                      methods=names, seeds=seeds, total_steps=total_steps)
        timing_path.write_text(json.dumps(timing, indent=2))
        print(f"sweep wall time {timing['wall_s'] / 60:.1f} min", flush=True)

    groups, left_out = load_groups(out, methods, seeds)
    if not groups:
        print("no finished runs to report", file=sys.stderr)
        return 1
    window = report.parse_window(WINDOW)
    summaries = [report.summarize(g, window) for g in groups]
    fig_dir = pathlib.Path(args.figures).resolve()
    figures = report.plot(summaries, fig_dir)
    write_report(pathlib.Path(args.results).resolve(), fig_dir, figures, groups, summaries, left_out, total_steps,
                 policy_info, timing, config_arg)
    (out / "summary.json").write_text(json.dumps({"window": WINDOW, "groups": [s.to_json() for s in summaries]},
                                                 indent=2))
    print(f"wrote {args.results} and {len(figures)} figures in {args.figures}", flush=True)
    return 0 if not (timing and timing.get("failures")) else 2


if __name__ == "__main__":
    sys.exit(main())
