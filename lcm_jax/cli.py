"""`lcm-jax`: sample, convert, export and evaluate from the command line.

    lcm-jax sample  --model DIR --prompt "a red circle" --steps 4 --seed 0 --out samples/
    lcm-jax convert --model DIR_OR_FILE --out DIR     # load with lcm-jax, write a diffusers folder
    lcm-jax export  --workdir runs/x --out DIR [--weights sampling|ema|eval_ema|online] [--lora-format peft|kohya]
    lcm-jax cache   --config CONFIG --out DIR         # encode a dataset once: an on-disk latent cache
    lcm-jax eval    --teacher DIR --lcm DIR [--evaluator MODULE:FACTORY]  # steps-vs-quality table
    lcm-jax plan    --config CONFIG --topology v5e-16 [--search-batch] [--sampler-steps 4]  # bytes, FLOPs, step time

Bad input (a missing folder, a wrong key, a bad size) prints one line `lcm-jax <cmd>: error: ...`
and exits with status 2; `--debug` (or LCM_JAX_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

from lcm_jax.errors import DEBUG_ENV, CliError, quiet_advice, report


# =============================================================================================
# Progress
# =============================================================================================


def stage(n: int, total: int, what: str) -> float:
    print(f"[{n}/{total}] {what} ...", flush=True)
    return time.perf_counter()


def done(t0: float, extra: str = "") -> None:
    print(f"      done in {time.perf_counter() - t0:.1f}s{extra}", flush=True)


def _need_folder(path: str, flag: str) -> None:
    if not os.path.isdir(path):
        raise CliError(f"{flag} {path}: no such folder")


def _writable_folder(path: str, flag: str) -> None:
    """An output folder: new, or an existing folder (checked before any work is done)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CliError(f"{flag} {path}: is a file; give a folder to write into")


def _at_least(value: int, lo: int, flag: str) -> None:
    if value < lo:
        raise CliError(f"{flag} must be >= {lo}, got {value}")


# =============================================================================================
# sample
# =============================================================================================


def cmd_sample(args: argparse.Namespace) -> None:
    """Writes one PNG per image and grid.png (rows: prompts, columns: images of a prompt)."""
    from lcm_jax.compilation import CompileMeter, enable_compilation_cache
    from lcm_jax.components import read_json
    from lcm_jax.evaluation.grids import save_grid
    from lcm_jax.pipeline import LCMPipeline, check_call, check_steps

    from lcm_jax.hub import is_hub_id, local_folder

    if not is_hub_id(args.model):
        _need_folder(args.model, "--model")
    _writable_folder(args.out, "--out")
    _at_least(args.num_images, 1, "--num-images")
    if args.lora and not os.path.isfile(args.lora):
        raise CliError(f"--lora {args.lora}: no such file")
    edit = _edit_inputs(args)
    args.model = local_folder(args.model)  # a Hub id: its snapshot, downloaded unless cached
    used = resolve_sampling(args)
    check_call(args.steps, args.guidance, args.height, args.width, args.sampler)  # before loading
    if os.path.exists(os.path.join(args.model, "model_index.json")):  # else loading names it
        check_steps(args.sampler, args.steps, read_json(os.path.join(
            args.model, "scheduler", "scheduler_config.json"), "a pipeline folder needs scheduler/"))
    cache_dir = enable_compilation_cache()
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
               f"{args.sampler} steps, guidance {args.guidance}, {args.height}x{args.width} ({used})")
    meter = CompileMeter()
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                  sampler=args.sampler)
    if edit is None:
        images = pipe(prompts, height=args.height, width=args.width, **common)
    elif "mask_image" in edit:
        images = pipe.inpaint(prompts, edit["image"], edit["mask_image"], args.strength, **common)
    else:
        images = pipe.img2img(prompts, edit["image"], args.strength, **common)
    done(t0, f" (XLA compile {meter.seconds:.1f}s, {meter.cache_hits} program(s) "
         f"from the persistent cache {cache_dir})")
    t0 = stage(total, total, f"writing {args.out}")
    os.makedirs(args.out, exist_ok=True)
    paths = _write_pngs(images, len(args.prompt), args.num_images, args.out)
    grid = os.path.join(args.out, "grid.png")
    save_grid(images, grid, nrow=args.num_images)
    done(t0)
    print(f"wrote {len(paths)} image(s) ({os.path.basename(paths[0])} ...) and {grid}")


def _edit_inputs(args: argparse.Namespace) -> Optional[dict]:
    """--init-image (img2img; with --mask, inpainting) as arrays, one per prompt image; None for
    text-to-image. Read before the model loads, so a bad file costs nothing."""
    import numpy as np
    from PIL import Image

    if args.mask and not args.init_image:
        raise CliError("--mask needs --init-image (the image to inpaint)")
    if not args.init_image:
        if args.strength is not None:
            raise CliError("--strength needs --init-image (it says how far to move from that image)")
        return None
    if args.strength is None:
        args.strength = 1.0 if args.mask else 0.8
    if not 0.0 < args.strength <= 1.0:
        raise CliError(f"--strength {args.strength}: must be in (0, 1]")
    edit = {}
    for key, path, mode in (("image", args.init_image, "RGB"), ("mask_image", args.mask, "L")):
        if path is None:
            continue
        try:
            edit[key] = np.asarray(Image.open(path).convert(mode))
        except (OSError, ValueError) as e:
            flag = "--init-image" if key == "image" else "--mask"
            raise CliError(f"{flag} {path}: cannot read it as an image ({e})") from e
    count = len(args.prompt) * args.num_images
    return {k: np.stack([v] * count) for k, v in edit.items()}


SAMPLING_FLAGS = {"height": "height", "width": "width", "steps": "num_inference_steps",
                  "guidance": "guidance_scale", "sampler": "sampler"}


def resolve_sampling(args: argparse.Namespace) -> str:
    """Fills the sampling flags not given from the model folder's lcm_jax_defaults.json (else the
    built-in defaults); returns where they came from, for the progress line."""
    from lcm_jax.pipeline import DEFAULTS_FILE, sampling_defaults

    defaults = sampling_defaults(args.model)
    unset = [flag for flag in SAMPLING_FLAGS if getattr(args, flag, None) is None]
    for flag in unset:
        setattr(args, flag, defaults[SAMPLING_FLAGS[flag]])
    source = DEFAULTS_FILE if os.path.exists(os.path.join(args.model, DEFAULTS_FILE)) else "built-in defaults"
    return f"{', '.join('--' + f for f in unset)} from {source}" if unset else "as given"


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
    from lcm_jax.components import load_components
    from lcm_jax.convert.unet import unet_to_diffusers

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


def cmd_export(args: argparse.Namespace) -> None:
    """LCD/LCF: the EMA target UNet (what the LCM recipe ships) as a diffusers folder; LCM-LoRA: a
    PEFT or kohya LoRA file. Reads only the exported weights of the checkpoint, on the host."""
    import tempfile

    from lcm_jax import fs
    from lcm_jax.convert.export import export_lora, export_pipeline
    from lcm_jax.training.checkpoints import load_run_config, restore_weights
    from lcm_jax.training.models import student_prediction

    if not fs.exists(args.workdir):
        raise CliError(f"--workdir {args.workdir}: no such folder")
    config = load_run_config(args.workdir)
    t0 = stage(1, 2, f"restoring the {args.weights} weights of {args.workdir} (method {config.method})")
    run = restore_weights(args.workdir, args.weights, args.step)
    done(t0, f" (step {run.step})")
    t0 = stage(2, 2, f"writing {args.out}")
    local_out, remote = args.out, fs.is_remote(args.out)
    if remote:  # written here, then uploaded whole
        local_out = os.path.join(tempfile.mkdtemp(prefix="lcm_jax_export_"), os.path.basename(args.out))
    if config.method == "lcm_lora":
        path = export_lora(run.params, config.lora.alpha / config.lora.rank, local_out, args.lora_format)
        if remote:  # a file goes into the out's folder, a folder to out itself
            single = args.out.endswith(".safetensors")
            fs.publish_dir(os.path.dirname(local_out) if single else local_out,
                           args.out.rsplit("/", 1)[0] if single else args.out)
            path = args.out if single else fs.join(args.out, os.path.basename(path))
        done(t0)
        base = config.model.teacher or "the run's random teacher"
        print(f"wrote {path}: LCM-LoRA ({args.lora_format}) for {base}; "
              "sample with `lcm-jax sample --model TEACHER --lora FILE --guidance 1`")
        return
    grid = None if config.method == "diffusion" else (config.loss.num_ddim_timesteps,
                                                      config.loss.timestep_scaling)
    teacher = fs.local_copy(config.model.teacher) if config.model.teacher else None
    what = export_pipeline(run.params, run.unet.config, local_out, teacher, grid,
                           prediction_type=student_prediction(config) or None)
    if remote:
        fs.publish_dir(local_out, args.out)
    done(t0)
    print(f"wrote {args.out}: {what}")


# =============================================================================================
# cache
# =============================================================================================


def load_config(spec: str, overrides: Sequence[str] = ()):
    """A config file's get_config(arg) from 'path.py[:arg]', locked, with 'key=value' overrides
    (values parsed as Python literals, else taken as strings), as `python -m lcm_jax.train`."""
    import ast
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise CliError(f"--config {path}: no such file")
    module_spec = importlib.util.spec_from_file_location("lcm_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise CliError(f"--set {item}: expected key=value, e.g. data.cache_size=10000")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        except (KeyError, AttributeError, TypeError) as e:
            raise CliError(f"--set {item}: {str(e).splitlines()[0]}") from e
    return config


def cmd_cache(args: argparse.Namespace) -> None:
    """Encodes data.cache_size examples of the config's dataset into an on-disk latent cache;
    train from it with --config.data.cache_dir=OUT. Rerun with the same --out to resume."""
    from lcm_jax.training import latent_cache

    config = load_config(args.config, args.set)
    t0 = stage(1, 1, f"encoding {config.data.cache_size} examples of data.source={config.data.source!r} "
               f"into {args.out}")
    latent_cache.build(config, args.out, chunk=args.chunk)
    done(t0)
    print(f"wrote {args.out}; train from it with --config.data.cache_dir={args.out}")


# =============================================================================================
# plan
# =============================================================================================


def cmd_plan(args: argparse.Namespace) -> None:
    """Compiles the config's train step for a target (no TPU needed) and prints its per-device
    bytes, FLOPs, roofline step time; with --search-batch the largest per-device batch that fits."""
    import jax

    from lcm_jax import planning

    config = load_config(args.config, args.set)
    if args.opt_level:
        jax.config.update("jax_optimization_level", args.opt_level)
    t0 = time.time()
    print(planning.format_plan(planning.plan_step(config, args.topology, args.batch_size)), flush=True)
    print(f"compiled in {time.time() - t0:.1f}s")
    if args.search_batch:
        best, plans = planning.search_batch(config, args.topology)
        tried = ", ".join(f"{p.batch_size // p.devices}:{'fits' if p.fits else 'no'}" for p in plans)
        print(f"largest per-device batch that fits: {best} (tried {tried})")
    if args.sampler_steps:
        t0 = time.time()
        plan = planning.plan_sampler(config, args.topology, args.sampler_batch, args.sampler_steps)
        print(f"sampler, {args.sampler_steps} steps and the VAE decode:\n" + planning.format_plan(plan), flush=True)
        print(f"compiled in {time.time() - t0:.1f}s")


# =============================================================================================
# eval
# =============================================================================================


DEFAULT_EVALUATOR = "lcm_jax.worlds.shapes.evaluator:ShapesEvaluator"


def load_evaluator(spec: str):
    """An evaluator from 'module:factory' (factory() -> evaluator(images, prompts) -> metrics,
    with .prompts(n, seed) -> held-out prompts)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CliError(f"--evaluator {spec}: cannot load it ({e}); give MODULE:FACTORY") from e
    return factory()


def cmd_eval(args: argparse.Namespace) -> int:
    """The steps-vs-quality table: teacher DDIM/DPM-Solver++ against an LCM (and optionally
    LCM-LoRA) at 1-8 steps, scored by the evaluator (by default the shapes world's FD and prompt
    accuracy from its shipped classifier)."""
    from lcm_jax.evaluation import harness, report
    from lcm_jax.pipeline import LCMPipeline

    _need_folder(args.teacher, "--teacher")
    _need_folder(args.lcm, "--lcm")
    _writable_folder(args.out, "--out")
    _at_least(args.num_prompts, 1, "--num-prompts")
    for n in args.steps:
        _at_least(n, 1, "--steps")
    evaluator = load_evaluator(args.evaluator)
    t0 = stage(1, 2, "loading teacher and LCM pipelines")
    teacher, lcm = LCMPipeline.from_pretrained(args.teacher), LCMPipeline.from_pretrained(args.lcm)
    lora = None
    if args.lora:
        lora = LCMPipeline.from_pretrained(args.teacher)
        lora.load_lora_weights(args.lora)
    done(t0)
    t0 = stage(2, 2, f"sampling {args.num_prompts} held-out prompts per row")
    prompts = evaluator.prompts(args.num_prompts, args.seed_prompts)
    runs = harness.quality_runs(teacher, lcm, lora, args.guidance, args.teacher_guidance,
                                steps=tuple(args.steps))
    rows = harness.steps_quality_table(runs, evaluator, prompts, seed=args.seed,
                                       batch=min(100, args.num_prompts))
    done(t0)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(report.table_markdown(rows))
    report.plot_table(rows, os.path.join(args.out, "quality.png"))
    print(report.table_markdown(rows))
    print(f"wrote {os.path.join(args.out, 'quality.md')} and {os.path.join(args.out, 'quality.png')}")
    return 0


# =============================================================================================
# main
# =============================================================================================


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none."""

    def _get_help_string(self, action):
        if action.default is None or action.required or action.help is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from lcm_jax.convert.export import LORA_WRITERS
    from lcm_jax.sampling import SAMPLERS

    from lcm_jax.pipeline import BUILTIN_DEFAULTS, DEFAULTS_FILE

    fmt = {"formatter_class": _HelpFormatter}
    parser = argparse.ArgumentParser(prog="lcm-jax", description=__doc__.split("\n")[0], **fmt)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="text-to-image with a diffusers LCM (or SD) pipeline folder", **fmt)
    s.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json), gs:// URL or Hub id org/name")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    for flag, kind in (("steps", int), ("guidance", float), ("height", int), ("width", int)):
        builtin = BUILTIN_DEFAULTS[SAMPLING_FLAGS[flag]]
        s.add_argument(f"--{flag}", type=kind, default=argparse.SUPPRESS,
                       help=f"default: the model folder's {DEFAULTS_FILE}, else {builtin}")
    s.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    s.add_argument("--num-images", type=int, default=1, help="images per prompt")
    s.add_argument("--sampler", choices=SAMPLERS, default=argparse.SUPPRESS,
                   help=f"default: the model folder's {DEFAULTS_FILE}, else {BUILTIN_DEFAULTS['sampler']}")
    s.add_argument("--lora", help="LCM-LoRA safetensors (PEFT/diffusers or kohya) to fuse in")
    s.add_argument("--lora-scale", type=float, default=1.0, help="strength of the fused LoRA")
    s.add_argument("--init-image", help="img2img: start from this image (its size is the output's)")
    s.add_argument("--mask", help="inpainting (with --init-image): repaint where this grayscale mask is white")
    s.add_argument("--strength", type=float, default=None,
                   help="how far from --init-image to go, in (0, 1] (default: 0.8; 1.0 with --mask)")
    s.add_argument("--out", required=True, help="folder for the PNGs and grid.png")

    k = sub.add_parser("cache", help="encode a dataset once into an on-disk latent cache", **fmt)
    k.add_argument("--config", required=True, help="training config file, path.py[:arg]")
    k.add_argument("--out", required=True, help="cache folder (an existing one is completed)")
    k.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set data.cache_size=10000 (repeatable)")
    k.add_argument("--chunk", type=int, default=256, help="examples per shard")

    c = sub.add_parser("convert", help="load a pipeline folder (or SD 1.x single file) and write it", **fmt)
    c.add_argument("--model", required=True, help="diffusers pipeline folder, or a .safetensors/.ckpt")
    c.add_argument("--out", required=True)

    e = sub.add_parser("export", help="a training workdir's latest checkpoint -> diffusers / LoRA", **fmt)
    e.add_argument("--workdir", required=True)
    e.add_argument("--out", required=True, help="folder (or a .safetensors path for LoRA runs)")
    e.add_argument("--weights", choices=("sampling", "ema", "eval_ema", "online"), default="sampling",
                   help="sampling: the slow eval EMA, else the target EMA, when the run keeps one, else "
                        "the trained weights")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.add_argument("--lora-format", choices=sorted(LORA_WRITERS), default="peft",
                   help="LoRA runs: PEFT/diffusers keys or kohya/A1111 keys")

    p = sub.add_parser("plan", help="compile the train step for a TPU slice or cpu:N; bytes, FLOPs, step time", **fmt)
    p.add_argument("--config", required=True, help="training config file, path.py[:arg]")
    p.add_argument("--topology", required=True, help="v5e-16, v5p-8, v4-32, v6e-8 (also v5e-4, v5e-8) or cpu:N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set model.remat=False (repeatable)")
    p.add_argument("--batch_size", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--search-batch", action="store_true",
                   help="also find the largest per-device batch that fits, by compiling")
    p.add_argument("--sampler-steps", type=int, default=0, metavar="N",
                   help="also plan the run's N-step sampler and VAE decode (inference, data-parallel, "
                        "--sampler-batch images)")
    p.add_argument("--sampler-batch", type=int, default=None, help="global sampler batch (default: one per device)")
    p.add_argument("--opt-level", choices=("O0", "O1", "O2", "O3"), default=None,  # planning.OPT_LEVELS
                   help="XLA optimisation level of the compiles (default: XLA's); O0 compiles an SD-size "
                        "step several times faster, its figures those of a less optimised program")

    v = sub.add_parser("eval", help="steps-vs-quality table (default evaluator: the shapes world)", **fmt)
    v.add_argument("--teacher", required=True, help="teacher pipeline folder (no w-embedding)")
    v.add_argument("--lcm", required=True, help="LCM pipeline folder (e.g. from lcm-jax export)")
    v.add_argument("--lora", default=None, help="LCM-LoRA safetensors for the teacher (4-step row)")
    v.add_argument("--guidance", type=float, default=6.0,
                   help="LCM guidance scale (w + 1); lcm_jax/worlds/shapes/configs/shapes_lcd.py distills guidance 3..9")
    v.add_argument("--teacher-guidance", type=float, default=5.0, help="the teacher rows' CFG scale")
    v.add_argument("--evaluator", default=DEFAULT_EVALUATOR,
                   help="MODULE:FACTORY of the evaluator (images, prompts) -> FD, prompt accuracy")
    v.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    v.add_argument("--num-prompts", type=int, default=200)
    v.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    v.add_argument("--seed-prompts", type=int, default=None, help="held-out split (default: the eval seed)")
    v.add_argument("--out", default="runs/eval")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], Optional[int]]] = {
    "sample": cmd_sample, "convert": cmd_convert, "export": cmd_export, "eval": cmd_eval,
    "cache": cmd_cache, "plan": cmd_plan}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one subcommand; returns the exit status (0 ok, 2 bad input or usage: one line on
    stderr, `lcm-jax CMD: error: ...`)."""
    args = build_parser().parse_args(argv)
    quiet_advice()
    return report(f"lcm-jax {args.command}", lambda: COMMANDS[args.command](args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
