"""`lcm-jax`: sample, convert, export and evaluate from the command line.

    lcm-jax sample  --model DIR --prompt "a red circle" --steps 4 --seed 0 --out samples/
    lcm-jax convert --model DIR_OR_FILE --out DIR     # load with lcm-jax, write a diffusers folder
    lcm-jax export  --workdir runs/x --out DIR        # training run -> diffusers folder / LoRA file
    lcm-jax eval    ...                               # steps-vs-quality table (lcm_jax.evaluate)

Bad input (a missing folder, a wrong key, a bad size) prints one line `lcm-jax <cmd>: error: ...`
and exits with status 1; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional, Sequence

LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer")
# The LCMScheduler fields a teacher's scheduler config may carry over (diffusers' signature).
LCM_SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                      "trained_betas", "clip_sample", "clip_sample_range", "set_alpha_to_one",
                      "steps_offset", "prediction_type", "thresholding", "dynamic_thresholding_ratio",
                      "sample_max_value", "timestep_spacing", "rescale_betas_zero_snr")


class CliError(Exception):
    """A user mistake: printed as one line, exit status 1."""


# =============================================================================================
# Progress
# =============================================================================================


class CompileMeter:
    """Counts XLA compile seconds and persistent-cache hits (jax.monitoring events) per stage."""

    _listening = False
    seconds = 0.0
    cache_hits = 0
    durations: dict = {}  # every jax.monitoring duration event since start(), summed by name

    @classmethod
    def start(cls) -> None:
        import jax

        if not cls._listening:
            jax.monitoring.register_event_duration_secs_listener(cls._on_duration)
            jax.monitoring.register_event_listener(cls._on_event)
            CompileMeter._listening = True
        CompileMeter.seconds, CompileMeter.cache_hits, CompileMeter.durations = 0.0, 0, {}

    @staticmethod
    def _on_duration(event: str, seconds: float, **_) -> None:
        CompileMeter.durations[event] = CompileMeter.durations.get(event, 0.0) + seconds
        if event == "/jax/core/compile/backend_compile_duration":
            CompileMeter.seconds += seconds

    @staticmethod
    def _on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            CompileMeter.cache_hits += 1


def stage(n: int, total: int, what: str) -> float:
    print(f"[{n}/{total}] {what} ...", flush=True)
    return time.perf_counter()


def done(t0: float, extra: str = "") -> None:
    print(f"      done in {time.perf_counter() - t0:.1f}s{extra}", flush=True)


def _need_folder(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise CliError(f"{flag} {path}: no such folder")


# =============================================================================================
# sample
# =============================================================================================


def cmd_sample(args: argparse.Namespace) -> None:
    """Writes one PNG per image and grid.png (rows: prompts, columns: images of a prompt)."""
    from lcm_jax.evaluate import save_grid
    from lcm_jax.pipeline import LCMPipeline, _check_call

    _need_folder(args.model, "--model")
    if args.num_images < 1:
        raise CliError(f"--num-images must be >= 1, got {args.num_images}")
    _check_call(args.steps, args.guidance, args.height, args.width, args.sampler)  # before loading
    total = 3 + bool(args.lora)
    t0 = stage(1, total, f"loading {args.model}")
    pipe = LCMPipeline.from_pretrained(args.model)
    done(t0)
    if args.lora:
        t0 = stage(2, total, f"loading LoRA {args.lora}")
        pipe.load_lora_weights(args.lora, scale=args.lora_scale)
        done(t0)
    prompts = [p for p in args.prompt for _ in range(args.num_images)]
    t0 = stage(total - 1, total, f"compiling and sampling {len(prompts)} image(s): {args.steps} "
               f"{args.sampler} steps, guidance {args.guidance}, {args.height}x{args.width}")
    CompileMeter.start()
    images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=args.height, width=args.width, seed=args.seed, sampler=args.sampler)
    done(t0, f" (XLA compile {CompileMeter.seconds:.1f}s, {CompileMeter.cache_hits} program(s) "
         f"from the persistent cache {pipe.cache_dir})")
    t0 = stage(total, total, f"writing {args.out}")
    os.makedirs(args.out, exist_ok=True)
    paths = _write_pngs(images, len(args.prompt), args.num_images, args.out)
    grid = os.path.join(args.out, "grid.png")
    save_grid(images, grid, nrow=args.num_images)
    done(t0)
    print(f"wrote {len(paths)} image(s) ({os.path.basename(paths[0])} ...) and {grid}")


def _write_pngs(images, num_prompts: int, per_prompt: int, out: str) -> list[str]:
    import numpy as np
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        p, k = divmod(i, per_prompt)
        path = os.path.join(out, f"{p:02d}_{k:02d}.png")
        Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


# =============================================================================================
# convert
# =============================================================================================


def cmd_convert(args: argparse.Namespace) -> None:
    """A diffusers folder: load everything, re-export the UNet; a single file: split it."""
    if os.path.isfile(args.model):
        _convert_single_file(args)
    else:
        _need_folder(args.model, "--model")
        _convert_folder(args.model, args.out)


def _convert_folder(src: str, out: str) -> None:
    from lcm_jax.convert.unet import unet_to_diffusers
    from lcm_jax.pipeline import load_components

    if os.path.abspath(src) == os.path.abspath(out):
        raise CliError("--out must differ from --model")
    t0 = stage(1, 2, f"loading {src} with lcm-jax")
    comps = load_components(src)
    done(t0)
    t0 = stage(2, 2, f"writing {out}")
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("unet"), dirs_exist_ok=True)
    unet_to_diffusers(comps.unet_params, comps.unet.config, os.path.join(out, "unet"))
    done(t0)
    print(f"wrote {out} (UNet re-exported by lcm-jax; other parts copied)")


def _convert_single_file(args: argparse.Namespace) -> None:
    try:
        from lcm_jax.convert import single_file
    except ImportError as e:
        raise CliError("single-file checkpoints are not supported in this version "
                       "(lcm_jax.convert.single_file is missing)") from e
    t0 = stage(1, 1, f"splitting {args.model} into unet/, vae/, text_encoder/")
    single_file.single_file_to_diffusers(args.model, args.out)
    done(t0)
    print(f"wrote {args.out}/{{unet,vae,text_encoder}}; add tokenizer/, scheduler/ and "
          "model_index.json (e.g. from the SD 1.5 folder) to sample from it")


# =============================================================================================
# export
# =============================================================================================


def load_run_config(workdir: str):
    """The resolved config a training run saved in workdir/config.json."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CliError(f"{workdir} is not a training workdir: it has no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def student_and_shapes(config) -> tuple[Any, Any]:
    """(trained UNet module, shapes of the trained params) from the config alone.

    The same modules as train.build_models, without loading the teacher's weights or compiling
    its init (minutes for SD); the checkpoint supplies every value.
    """
    import jax

    from lcm_jax import train
    from lcm_jax.convert.common import read_config
    from lcm_jax.convert.unet import unet_shapes
    from lcm_jax.models import lora as lora_lib
    from lcm_jax.models.unet import UNet2DConditionModel

    mc = config.model
    teacher = mc.teacher
    unet_cfg = read_config(os.path.join(teacher, "unet")) if teacher else dict(mc.unet.to_dict())
    if train._uses_w_embedding(config):
        unet_cfg = {**unet_cfg, "time_cond_proj_dim": mc.time_cond_proj_dim}
    unet = UNet2DConditionModel.from_config(unet_cfg, dtype=train._dtype(mc.compute_dtype))
    shapes = unet_shapes(unet)
    if config.method == "lcm_lora":  # init_lora reads only the kernels' shapes
        lora = lora_lib.init_lora(jax.random.PRNGKey(0), shapes, config.lora.rank)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora)
    return unet, shapes


def restore_run(config, workdir: str, step: Optional[int] = None) -> tuple[Any, Any]:
    """(trained UNet module, TrainState) of the workdir's checkpoint at `step` (default: the
    latest), on one local device."""
    import jax

    from lcm_jax import train

    unet, shapes = student_and_shapes(config)
    init_state = train.make_init_state(config, train.make_optimizer(config)[0])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            jax.eval_shape(init_state, shapes))
    mngr = train.checkpoint_manager(workdir, config)
    try:
        if step is not None and step not in mngr.all_steps():
            raise CliError(f"{workdir}/checkpoints has no step {step}; it holds "
                           f"{sorted(mngr.all_steps())}")
        state = train.restore_checkpoint(mngr, abstract, step)
    finally:
        mngr.close()
    if state is None:
        raise CliError(f"{workdir}/checkpoints holds no finished checkpoint")
    return unet, state


def cmd_export(args: argparse.Namespace) -> None:
    """LCD/LCF: the EMA target UNet (what the LCM recipe ships); LCM-LoRA: a PEFT LoRA file."""
    _need_folder(args.workdir, "--workdir")
    config = load_run_config(args.workdir)
    t0 = stage(1, 2, f"restoring the latest checkpoint of {args.workdir} (method {config.method})")
    unet, state = restore_run(config, args.workdir)
    done(t0, f" (step {int(state.step)})")
    t0 = stage(2, 2, f"writing {args.out}")
    if config.method == "lcm_lora":
        path = _export_lora(config, state, args.out)
        done(t0)
        base = config.model.teacher or "the run's random teacher"
        print(f"wrote {path}: LCM-LoRA for {base}; "
              "sample with `lcm-jax sample --model TEACHER --lora FILE --guidance 1`")
        return
    params = state.target_params if state.target_params is not None else state.params
    what = export_unet_pipeline(params, unet.config, config, args.out)
    done(t0)
    print(f"wrote {args.out}: {what}")


def _export_lora(config, state, out: str) -> str:
    from lcm_jax.convert.lora import save_lora_peft

    path = out if out.endswith(".safetensors") else os.path.join(out, LORA_FILE)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_lora_peft(state.params, config.lora.alpha / config.lora.rank, path)
    return path


def export_unet_pipeline(params: Any, unet_config: Any, config, out: str) -> str:
    """out/unet; with a teacher folder also its vae/text_encoder/tokenizer, an LCMScheduler
    config and model_index.json, so that the result is a complete pipeline folder."""
    from lcm_jax.convert.unet import unet_to_diffusers

    unet_to_diffusers(params, unet_config, os.path.join(out, "unet"))
    teacher = config.model.teacher
    if not teacher:
        return "unet/ only (the run's teacher is a random UNet: no VAE or text encoder to copy)"
    for part in PIPELINE_PARTS:
        shutil.copytree(os.path.join(teacher, part), os.path.join(out, part), dirs_exist_ok=True)
    with open(os.path.join(teacher, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    with open(os.path.join(teacher, "model_index.json")) as f:
        index = json.load(f)
    if config.method != "diffusion":
        sched, index = lcm_scheduler_config(sched, config), lcm_model_index(index)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    _write_json(sched, os.path.join(out, "scheduler", "scheduler_config.json"))
    _write_json(index, os.path.join(out, "model_index.json"))
    return f"a pipeline folder (unet/ from the run, {', '.join(PIPELINE_PARTS)} from {teacher})"


def lcm_scheduler_config(teacher: dict, config) -> dict:
    """LCMScheduler config with the teacher's noise schedule and the run's skipping grid."""
    out = {k: teacher[k] for k in LCM_SCHEDULER_KEYS if k in teacher}
    out.update(_class_name="LCMScheduler", original_inference_steps=config.loss.num_ddim_timesteps,
               timestep_scaling=config.loss.timestep_scaling)
    return out


def lcm_model_index(teacher: dict) -> dict:
    index = {k: v for k, v in teacher.items() if not k.startswith("_")}
    for part in ("safety_checker", "feature_extractor", "image_encoder"):
        if part in index:
            index[part] = [None, None]
    index.update(_class_name="LatentConsistencyModelPipeline", scheduler=["diffusers", "LCMScheduler"],
                 requires_safety_checker=False)
    return index


def _write_json(obj: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


# =============================================================================================
# eval
# =============================================================================================


def cmd_eval(args: argparse.Namespace) -> int:
    """The steps-vs-quality table on the shapes world: teacher DDIM/DPM-Solver++ against an LCM
    (and optionally LCM-LoRA) at 1-8 steps; FD and prompt accuracy from the shipped classifier."""
    from lcm_jax import demo, evaluate
    from lcm_jax.pipeline import LCMPipeline

    _need_folder(args.teacher, "--teacher")
    _need_folder(args.lcm, "--lcm")
    t0 = stage(1, 2, "loading teacher and LCM pipelines")
    teacher, lcm = LCMPipeline.from_pretrained(args.teacher), LCMPipeline.from_pretrained(args.lcm)
    lora = None
    if args.lora:
        lora = LCMPipeline.from_pretrained(args.teacher)
        lora.load_lora_weights(args.lora)
    done(t0)
    t0 = stage(2, 2, f"sampling {args.num_prompts} held-out prompts per row")
    prompts, _ = evaluate.heldout_prompts(args.num_prompts, args.seed_prompts) if args.seed_prompts \
        else evaluate.heldout_prompts(args.num_prompts)
    runs = demo.quality_runs(teacher, lcm, lora, args.guidance, steps=tuple(args.steps))
    rows = evaluate.steps_quality_table(runs, evaluate.ShapesEvaluator(), prompts, seed=args.seed,
                                        batch=min(100, args.num_prompts))
    done(t0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(evaluate.table_markdown(rows))
    evaluate.plot_table(rows, os.path.join(args.out, "quality.png"))
    print(evaluate.table_markdown(rows))
    print(f"wrote {os.path.join(args.out, 'quality.md')} and {os.path.join(args.out, 'quality.png')}")
    return 0


# =============================================================================================
# main
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    from lcm_jax.pipeline import SAMPLERS

    parser = argparse.ArgumentParser(prog="lcm-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text-to-image with a diffusers LCM (or SD) pipeline folder")
    s.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json)")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--guidance", type=float, default=8.5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--num-images", type=int, default=1, help="images per prompt")
    s.add_argument("--sampler", choices=SAMPLERS, default="lcm")
    s.add_argument("--lora", help="LCM-LoRA safetensors (PEFT/diffusers or kohya) to fuse in")
    s.add_argument("--lora-scale", type=float, default=1.0)
    s.add_argument("--out", required=True, help="folder for the PNGs and grid.png")

    c = sub.add_parser("convert", help="load a pipeline folder (or SD 1.x single file) and write it")
    c.add_argument("--model", required=True, help="diffusers pipeline folder, or a .safetensors/.ckpt")
    c.add_argument("--out", required=True)

    e = sub.add_parser("export", help="a training workdir's latest checkpoint -> diffusers / LoRA")
    e.add_argument("--workdir", required=True)
    e.add_argument("--out", required=True, help="folder (or a .safetensors path for LoRA runs)")

    v = sub.add_parser("eval", help="steps-vs-quality table on the shapes world")
    v.add_argument("--teacher", required=True, help="teacher pipeline folder (no w-embedding)")
    v.add_argument("--lcm", required=True, help="LCM pipeline folder (e.g. from lcm-jax export)")
    v.add_argument("--lora", default=None, help="LCM-LoRA safetensors for the teacher (4-step row)")
    v.add_argument("--guidance", type=float, default=6.0,
                   help="LCM guidance scale (w + 1); configs/shapes_lcd.py distills guidance 3..9")
    v.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    v.add_argument("--num-prompts", type=int, default=200)
    v.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    v.add_argument("--seed-prompts", type=int, default=None, help="held-out split (default: the eval seed)")
    v.add_argument("--out", default="runs/eval")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], Optional[int]]] = {
    "sample": cmd_sample, "convert": cmd_convert, "export": cmd_export, "eval": cmd_eval}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one subcommand; returns the exit status (0 ok, 1 bad input, 2 usage / unavailable)."""
    args = build_parser().parse_args(argv)
    from lcm_jax.convert.common import WeightsError

    try:
        return COMMANDS[args.command](args) or 0
    except (CliError, WeightsError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lcm-jax {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
