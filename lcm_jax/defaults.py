"""Every training config field, with its one meaning and its default.

Experiment files in configs/ start from `base_config()` and change what they need; configs are
locked, so a misspelt override (`--config.optim.lr=...`) fails instead of being ignored.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "lcd"            # 'lcd' | 'lcm_lora' | 'lcf' | 'tcd' | 'pcm' | 'guided' | 'diffusion'
                                # guided: guidance distillation (Meng et al. 2023, stage one), the
                                #   w-conditioned student learns the teacher's CFG prediction in
                                #   its own loss.student_prediction; a start for an x0 / v LCD
                                #   student (model.student_init)
                                # tcd: trajectory consistency distillation (Zheng et al. 2024), the
                                #   student maps x_t to x_s, s <= t_n drawn on the grid; sample it
                                #   with the TCD sampler (gamma). pcm: phased consistency (Wang et
                                #   al. 2024), loss.pcm_phases phases, x_t to its phase's lower
                                #   edge; sample it deterministically edge to edge: the TCD sampler
                                #   at gamma 0 on losses.consistency.pcm_timesteps. Both are full
                                #   w-conditioned students like lcd (losses/consistency.py)
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 8            # global batch (all processes, all micro-batches)
    c.log_every = 10
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.eval_every = 0            # fixed-batch, fixed-noise loss every N steps (at log steps); 0: off
    c.sample_every = 0          # 0: no sample grids during training
    c.eval_endpoint_timesteps = ()  # LCD/LCM-LoRA, at eval steps: one-step MSE to the teacher's
                                    # ODE chain endpoint from these grid timesteps (e.g. 999, 759)
    c.eval_endpoint_batch = 16      # examples of the eval batch it runs the teacher's chain on
                                    # (not for 'pcm', whose student steps one phase at a time)
    c.eval_ema_decay = 0.0      # >0 (e.g. 0.999-0.9999): a slow EMA of the trained weights, kept
                                # apart from the target network's (TrainState.eval_params); it
                                # samples, evaluates and exports (`lcm-jax export --weights
                                # sampling|eval_ema`). 0: none, the target EMA samples
    c.compilation_cache_dir = ""  # persistent XLA cache; "" = $LCM_JAX_CACHE_DIR or ~/.cache/lcm_jax/xla
    c.sample_prompts = ["a photograph of an astronaut riding a horse"]

    c.model = ml_collections.ConfigDict()
    c.model.teacher = ""        # diffusers pipeline folder; "" = random tiny teacher from model.unet
    c.model.components = ""     # with model.teacher "": folder for vae/text encoder/tokenizer/scheduler
    c.model.unet = ml_collections.ConfigDict()  # UNet config used when model.teacher is ""
    c.model.time_cond_proj_dim = 256   # the student's w-embedding size (LCD); 0 disables it
    c.model.w_embedding_init = "zeros"  # its new cond_proj: 'zeros' (student = teacher at step 0)
                                        # | 'uniform' (torch Linear's default, as diffusers' LCD)
    c.model.prediction_type = "epsilon"  # for the random teacher only (folders carry their own)
    c.model.compute_dtype = "float32"  # 'bfloat16' for bf16 compute with fp32 master weights
    c.model.param_dtype = "float32"
    c.model.teacher_dtype = "float32"  # the frozen teacher may be stored in bfloat16
    c.model.remat = False              # rematerialise UNet blocks to save activation memory
    c.model.init_seed = 0
    c.model.student_init = ""          # a training workdir: the student starts from its online
                                       # weights (latest checkpoint) instead of the teacher's; e.g.
                                       # a method='guided' run that put the teacher into the
                                       # x0 / v parameterisation of loss.student_prediction

    c.loss = ml_collections.ConfigDict()
    c.loss.num_ddim_timesteps = 50  # N, skipping step k = T / N
    c.loss.w_min = 5.0              # w ~ U[w_min, w_max], guidance scale w + 1
    c.loss.w_max = 15.0
    c.loss.loss_type = "huber"      # 'l2' | 'huber'
    c.loss.huber_c = 0.001
    c.loss.sigma_data = 0.5
    c.loss.timestep_scaling = 10.0
    c.loss.timestep_weighting = "uniform"  # loss weight lambda(t): 'uniform' (the paper) | 'snr'
    c.loss.timestep_sampling = "uniform"   # how t_{n+k} is drawn on the skipping grid: 'uniform'
                                    # (the paper) | 'sampler': P(n) proportional to 1 + how many of
                                    # the LCM sampler's 1/2/4/8-step schedules (PCM: phase edges)
                                    # visit t_{n+k} (consistency.sampling_probs)
    c.loss.student_prediction = "teacher"  # what the student UNet outputs: 'teacher' (the teacher's
                                    # own prediction_type, as the weights it starts from) |
                                    # 'epsilon' | 'x0' | 'v'. The loss applies c_skip/c_out (LCD) or
                                    # the semi-linear map (TCD/PCM) to the x0 it implies, so an x0/v
                                    # student's 1-step error is not an epsilon error times
                                    # 1/sqrt(abar). Samplers, the pipeline over a run and `lcm-jax
                                    # export` (its scheduler config's prediction_type: 'epsilon',
                                    # 'sample', 'v_prediction') read the output as this
    c.loss.pcm_phases = 4           # PCM: M phases of the N-step grid (1 <= M <= N)
    c.loss.coarse_ddim_timesteps = 0  # LCD: N_c > 0 mixes skipping steps: a coarse_fraction of the
    c.loss.coarse_fraction = 0.5    # hops skip k_c = T / N_c (a multiple of k) on the N_c-step grid
    c.loss.ema_decay = 0.95         # LCD/LCF/TCD/PCM target network theta-
    c.loss.lora_target_ema = False  # LCM-LoRA: keep an EMA (ema_decay) of the LoRA factors as the
                                    # target theta-; False: diffusers' recipe (the student itself),
                                    # which drifts past ~1200 shapes steps (README, 3000-step table)
    c.diffusion_ema_decay = 0.0     # method='diffusion': EMA of the weights (exported); 0 = none
    c.loss.solver = "ddim"
    c.loss.lcf_w = 7.0              # LCF: the fixed w the student is conditioned on

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 64
    c.lora.alpha = 64.0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-6
    c.optim.schedule = "constant"   # 'constant' | 'cosine', both after linear warmup
    c.optim.warmup_steps = 500
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 1e-2
    c.optim.grad_clip = 1.0
    c.optim.grad_accum_steps = 1

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # -1: all devices not used by fsdp
    c.mesh.fsdp = 1
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = [("^.*$", "fsdp")]  # (regex on param path, 'fsdp' | 'replicate')

    c.data = ml_collections.ConfigDict()
    c.data.source = "folder"        # 'folder' | 'webdataset' | 'parquet' | 'array_record' | 'shapes' | 'synthetic'
    c.data.path = ""                # folder with metadata.jsonl; or shards: a folder, glob or brace
                                    # pattern (shards/{00000..01023}.tar); gs:// works (etils.epath)
    c.data.index_dir = ""           # webdataset: folder for shard member indexes; "" = beside the shards
    c.data.image_key = ""           # webdataset member extensions ('jpg;png') | parquet column; "" = auto
    c.data.caption_key = ""         # webdataset: 'txt' or a .json field | parquet column; "" = auto
    c.data.filters = ""             # metadata thresholds, e.g. 'aesthetic>=5.0,punsafe<=0.5' (data/filters.py)
    c.data.min_size = 0             # drop images whose original shorter side is below this; 0 = off
    c.data.max_aspect_ratio = 0.0   # drop images with longer/shorter side above this; 0 = off
    c.data.crop = "center"          # 'center' | 'random' (seeded by seed, step, slot: resume is exact)
    c.data.flip_prob = 0.0          # probability of a horizontal flip
    c.data.num_workers = 0          # source.iterate: decoding processes; 0 = one thread in-process
    c.data.prefetch_batches = 2     # source.iterate: batches buffered ahead (per worker)
    c.data.resolution = 512
    c.data.latent_size = 64         # resolution / 8
    c.data.text_len = 77
    c.data.caption_dropout = 0.0    # probability of the empty prompt (every method)
    c.data.world_seed = 0           # shapes world
    c.data.understated = 0.0        # shapes world: fraction of captions that leave attributes out
    c.data.num_examples = 100000
    c.data.cache_size = 0           # >0: encode this many examples once (latent cache), not per step
    c.data.cache_dir = ""           # an on-disk latent cache (`lcm-jax cache`) to train from instead
    return c


def tiny_unet() -> dict:
    """A two-level SD-style UNet small enough to train on a laptop CPU in seconds."""
    return {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8,
        "cross_attention_dim": 32, "norm_num_groups": 8,
    }


def lcd_recipe(teacher: str, resolution: int = 512) -> ml_collections.ConfigDict:
    """The LCM paper's LCD recipe for a Stable Diffusion teacher folder (diffusers layout)."""
    c = base_config()
    c.method = "lcd"
    c.model.teacher = teacher
    c.model.time_cond_proj_dim = 256      # w-embedding dimension
    c.model.compute_dtype = "bfloat16"    # fp32 master weights, bf16 activations
    c.model.teacher_dtype = "bfloat16"
    c.model.remat = True
    c.total_steps = 100_000
    c.batch_size = 72                     # the paper's batch size
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.sample_every = 1000
    c.sample_prompts = ["a photograph of an astronaut riding a horse",
                        "a red fox in the snow, detailed", "a bowl of fruit, oil painting"]
    c.loss.num_ddim_timesteps = 50        # N = 50, skipping step k = 20
    c.loss.w_min, c.loss.w_max = 5.0, 15.0
    c.loss.loss_type = "huber"
    c.loss.ema_decay = 0.95
    c.optim.learning_rate = 8e-6          # the paper; diffusers' example uses 1e-6 at batch 12
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.0
    c.data.source = "folder"
    c.data.resolution = resolution
    c.data.latent_size = resolution // 8
    return c


def lcm_lora_recipe(teacher: str, resolution: int = 512) -> ml_collections.ConfigDict:
    """diffusers' LCM-LoRA recipe: rank 64 on attention, FF, proj, resnet convs, time embedding."""
    c = lcd_recipe(teacher, resolution)
    c.method = "lcm_lora"
    c.lora.rank = 64
    c.lora.alpha = 64.0
    c.total_steps = 1000
    c.batch_size = 12
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 200
    c.sample_every = 200
    c.loss.w_min, c.loss.w_max = 3.0, 15.0
    c.optim.learning_rate = 1e-4
    c.optim.warmup_steps = 0
    return c
