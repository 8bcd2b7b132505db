"""Retrains the bundled shapes teacher from scratch and ships it as a diffusers pipeline folder.

    python lcm_jax/worlds/shapes/build_teacher.py [--workdir runs/shapes_build]
        [--out lcm_jax/worlds/shapes/assets/teacher] [--vae_steps N] [--teacher_steps N]

1. `python -m lcm_jax.worlds.shapes.train_vae --config=lcm_jax/worlds/shapes/configs/shapes_vae.py` -> WORKDIR/vae/components/
2. `python -m lcm_jax.train --config=lcm_jax/worlds/shapes/configs/shapes_teacher.py:WORKDIR/vae/components`
   -> WORKDIR/teacher/checkpoints/
3. components + unet/ (the final checkpoint's params) -> a temp folder; evaluated there (50-step
   DDIM with CFG on held-out prompts: FD and prompt accuracy with ShapesEvaluator, a grid PNG);
   README.md written with the recipe and the numbers; then renamed onto --out.
`--skip_training` reassembles and re-evaluates from an existing WORKDIR.

    python lcm_jax/worlds/shapes/build_teacher.py --from_teacher FOLDER [--teacher_steps N] [--teacher_lr LR]

continues an existing teacher instead (how the shipped one was made from the previous build when
the world's captions began to leave attributes out): FOLDER -> WORKDIR/init (VAE and text encoder
kept: the images did not change; `--text_steps N` continues the encoder's pretraining on the new
captions first; `--latent_scale B` multiplies the VAE's scaling_factor by B, every SNR by B**2),
then the UNet fine-tuned from FOLDER's (`method='diffusion'`, model.teacher=WORKDIR/init).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from lcm_jax.worlds.shapes import CONFIG_DIR, TEACHER_DIR

DEFAULT_OUT = TEACHER_DIR


# --from_teacher: the text encoder is kept unless --text_steps > 0 (continuing its pretraining on
# the new captions moved its states; the UNet fine-tuned on them lost quality on fully stated
# prompts: assets/teacher/README.md).
FINETUNE = {"text_lr": 1e-3, "teacher_steps": 3000, "teacher_lr": 2e-4}


def run_step(args: list[str]) -> float:
    """Runs one training command, streaming its output; returns seconds."""
    print("+ " + " ".join(args), flush=True)
    t0 = time.time()
    subprocess.run([sys.executable] + args, check=True)
    return time.time() - t0


def final_unet_params(teacher_workdir: str):
    """The UNet params of the latest orbax checkpoint in `teacher_workdir`/checkpoints: the EMA
    of the weights when the run kept one (config diffusion_ema_decay), else the weights."""
    import orbax.checkpoint as ocp

    ckdir = os.path.abspath(os.path.join(teacher_workdir, "checkpoints"))
    steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) if os.path.isdir(ckdir) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {ckdir}: train the teacher first (run this tool "
                                "without --skip_training)")
    restored = ocp.StandardCheckpointer().restore(os.path.join(ckdir, str(steps[-1]), "default"))
    ema = restored.get("target_params")
    return (ema if ema else restored["params"]), steps[-1]


def assemble(components: str, teacher_workdir: str, out_dir: str) -> int:
    """components + unet/ from the final checkpoint -> `out_dir` (a pipeline folder); its step."""
    from lcm_jax.convert.unet import unet_to_diffusers
    from lcm_jax.worlds.shapes.train_vae import model_index

    params, step = final_unet_params(teacher_workdir)
    with open(os.path.join(teacher_workdir, "config.json")) as f:
        unet_cfg = json.load(f)["model"]["unet"]
    shutil.copytree(components, out_dir)
    unet_to_diffusers(params, unet_cfg, os.path.join(out_dir, "unet"))
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(model_index(unet=True), f, indent=2)
    return step


def evaluate_teacher(folder: str, guidances: list[float], num_prompts: int, steps: int,
                     grid_path: str, batch: int = 64, understated: float | None = None) -> list[dict]:
    """FD and prompt accuracy of `steps`-step DDIM with CFG at each guidance, on held-out prompts
    (`understated` of them leave attributes out; None: the world's rate)."""
    from lcm_jax.evaluation.grids import save_grid
    from lcm_jax.worlds.shapes.evaluator import ShapesEvaluator, heldout_prompts
    from lcm_jax.pipeline import LCMPipeline

    pipe = LCMPipeline.from_pretrained(folder)
    evaluator = ShapesEvaluator()
    prompts, _ = heldout_prompts(num_prompts, **({} if understated is None else {"understated": understated}))
    rows, best = [], None
    for g in guidances:
        t0 = time.time()
        images = np.concatenate([
            pipe(prompts[s:s + batch], num_inference_steps=steps, guidance_scale=g, height=64,
                 width=64, seed=s, sampler="ddim") for s in range(0, len(prompts), batch)])
        row = {"guidance_scale": g, "steps": steps, "num_prompts": len(prompts), "understated": understated,
               "seconds": round(time.time() - t0, 1), **evaluator(images, prompts)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if best is None or row["prompt_accuracy"] > best[0]["prompt_accuracy"]:
            best = (row, images)
    save_grid(best[1][:32], grid_path, nrow=8)
    return rows


README = """# shapes teacher

The bundled text-to-image teacher of the procedural shapes world (`lcm_jax/data/shapes.py`): a
diffusers pipeline folder (LatentConsistencyModelPipeline layout; loads with diffusers'
`StableDiffusionPipeline`/`LatentConsistencyModelPipeline` and with `lcm_jax.LCMPipeline`),
64x64 images from 8x8x4 latents.

- vae/: AutoencoderKL {vae_channels}, factor 8, trained {vae_steps} steps ({rec} + {beta} KL,
  foreground weight {fw}),
  scaling_factor {scale:.4f} (1 / std of its latents). Held-out reconstructions: mean abs error
  {mae:.2f}/255; classifier prompt accuracy {acc_rec:.3f} (originals {acc_orig:.3f}).
- text_encoder/: CLIPTextModel (hidden {hidden}, {layers} layers), {text_note}, frozen.
- tokenizer/: lcm_jax/worlds/shapes/assets/tokenizer. scheduler/: SD's scaled_linear schedule.
- unet/: UNet2DConditionModel {unet_channels}, trained from scratch with `method='diffusion'`
  (epsilon, caption dropout 0.1 for CFG) for {teacher_steps} steps at batch {batch} on a latent
  cache (lcm_jax/worlds/shapes/configs/shapes_teacher.py), on a 2-core CPU; the shipped weights are their EMA
  (decay {ema}).

Rebuild from scratch: `python lcm_jax/worlds/shapes/build_teacher.py` (VAE {vae_min:.0f} min, teacher
{teacher_min:.0f} min on that CPU).

Quality: 50-step DDIM with classifier-free guidance on {num_prompts} held-out prompts
(`lcm_jax.worlds.shapes.evaluator.heldout_prompts`, `ShapesEvaluator`; FD on classifier features vs 2000 real
held-out images):

| guidance | prompt accuracy | FD | background | shape | color | size | position |
|---|---|---|---|---|---|---|---|
{table}

grid.png: samples at the best guidance.
{note}"""


def text_encoder_note(out_dir: str) -> str:
    """How text_encoder/ was made, from its pretrain.json (lcm_jax/train_text_encoder.py)."""
    path = os.path.join(out_dir, "text_encoder", "pretrain.json")
    if not os.path.exists(path):
        return "random init (seed 0)"
    with open(path) as f:
        r = json.load(f)
    return (f"pretrained on captions for {r['pretrain_steps']} steps with the cell-attribute probe "
            f"of `lcm_jax/worlds/shapes/train_text_encoder.py` (held-out caption accuracy "
            f"{r['heldout_caption_accuracy']:.3f})")


def write_readme(out_dir: str, vae_cfg: dict, vae_eval: dict, teacher_cfg: dict, rows: list[dict],
                 times: dict, note: str = "") -> None:
    table = "\n".join(
        f"| {r['guidance_scale']} | {r['prompt_accuracy']:.3f} | {r['fd']:.2f} | "
        f"{r['acc/background']:.3f} | {r['acc/shape']:.3f} | {r['acc/color']:.3f} | "
        f"{r['acc/size']:.3f} | {r['acc/position']:.3f} |" for r in rows)
    text = README.format(
        vae_channels=vae_cfg["vae"]["block_out_channels"], vae_steps=vae_eval["steps"],
        beta=vae_cfg["loss"]["beta"], rec=vae_cfg["loss"]["reconstruction"].upper(),
        fw=vae_cfg["loss"].get("foreground_weight", 1.0),
        batch=teacher_cfg["batch_size"], ema=teacher_cfg.get("diffusion_ema_decay", 0.0),
        scale=vae_eval["scaling_factor"], mae=vae_eval["mae_0_255"],
        acc_rec=vae_eval["prompt_accuracy_reconstructed"],
        acc_orig=vae_eval["prompt_accuracy_original"],
        hidden=vae_cfg["text_encoder"]["hidden_size"],
        layers=vae_cfg["text_encoder"]["num_hidden_layers"], text_note=text_encoder_note(out_dir),
        unet_channels=teacher_cfg["model"]["unet"]["block_out_channels"],
        teacher_steps=teacher_cfg["total_steps"], vae_min=times.get("vae", vae_eval["train_seconds"]) / 60,
        teacher_min=times.get("teacher", float("nan")) / 60, num_prompts=rows[0]["num_prompts"],
        table=table, note=f"\n{note}\n" if note else "")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(text)


def logged_train_seconds(metrics_path: str) -> float:
    """Training time from a run's metrics.jsonl (steps between log lines / steps_per_s)."""
    total, last = 0.0, 0
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            total += (row["step"] - last) / max(row["steps_per_s"], 1e-9)
            last = row["step"]
    return total


def folder_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def scale_latents(components: str, latent_scale: float) -> None:
    """Multiplies the VAE's scaling_factor in `components`/vae/config.json by `latent_scale`:
    every noise level's SNR times latent_scale**2 under the same schedule (Chen 2023's input
    scaling), so that a world with little detail per latent is not already decided at t = 259."""
    path = os.path.join(components, "vae", "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["scaling_factor"] *= latent_scale
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def finetune_steps(from_teacher: str, workdir: str, teacher_steps: int, text_steps: int,
                   latent_scale: float = 1.0, teacher_lr: float = 0.0) -> dict:
    """FROM_TEACHER -> WORKDIR/init (with `text_steps` > 0: its text encoder's pretraining
    continued on this world's captions; `latent_scale`: scale_latents), its UNet fine-tuned into
    WORKDIR/teacher; returns seconds per stage."""
    init, teacher_dir = os.path.join(workdir, "init"), os.path.join(workdir, "teacher")
    if not os.path.exists(init):
        shutil.copytree(from_teacher, f"{init}.tmp", dirs_exist_ok=True)
        if latent_scale != 1.0:
            scale_latents(f"{init}.tmp", latent_scale)
        os.replace(f"{init}.tmp", init)
    times = {}
    if text_steps:
        times["text_encoder"] = run_step([
            "-m", "lcm_jax.worlds.shapes.train_text_encoder", f"--config={CONFIG_DIR}/shapes_vae.py",
            f"--components={init}", f"--config.text_encoder.pretrain_steps={text_steps}",
            f"--config.text_encoder.pretrain_learning_rate={FINETUNE['text_lr']}"])
    times["teacher"] = run_step([
        "-m", "lcm_jax.train", f"--config={CONFIG_DIR}/shapes_teacher.py", f"--workdir={teacher_dir}",
        f"--config.model.teacher={init}", "--config.model.components=",
        f"--config.total_steps={teacher_steps or FINETUNE['teacher_steps']}",
        f"--config.optim.learning_rate={teacher_lr or FINETUNE['teacher_lr']}",
        "--config.checkpoint_every=500"])
    return times


FINETUNE_README = """# shapes teacher

The bundled text-to-image teacher of the procedural shapes world (`lcm_jax/worlds/shapes/world.py`):
a diffusers pipeline folder (loads with diffusers' `StableDiffusionPipeline` and with
`lcm_jax.LCMPipeline`), 64x64 images from 8x8x4 latents. Half of its training captions
(`world.UNDERSTATED`) leave attributes out, so one caption can have many right images.

Made from the previous build ({base}) by `python lcm_jax/worlds/shapes/build_teacher.py
--from_teacher FOLDER`:
- {vae_line}
- text_encoder/: {text_line}; frozen.
- unet/: fine-tuned from the previous UNet with `method='diffusion'` (epsilon, caption dropout
  0.1 for CFG) for {teacher_steps} steps at batch {batch}, lr {teacher_lr:g} cosine, on a latent
  cache of {cache} examples; the shipped weights are the EMA (decay {ema}). {teacher_min:.0f} min
  on a 2-core CPU.

Quality: 50-step DDIM with classifier-free guidance on {num_prompts} held-out prompts
(`evaluator.heldout_prompts`, `ShapesEvaluator`; FD on classifier features vs 2000 real held-out
images; accuracy judges only what a prompt states):

| prompts | guidance | prompt accuracy | FD | background | shape | color | size | position |
|---|---|---|---|---|---|---|---|---|
{table}

grid.png: samples at the best guidance.
{note}"""


def vae_note(base: str, out_dir: str) -> str:
    """The README line on vae/: unchanged, or its latents rescaled (scale_latents)."""
    def scale(folder):
        with open(os.path.join(folder, "vae", "config.json")) as f:
            return json.load(f)["scaling_factor"]

    was, now = scale(base), scale(out_dir)
    b = now / was
    if abs(b - 1.0) < 1e-9:
        return ("vae/, tokenizer/, scheduler/: that build's, unchanged (the world's images did not "
                "change).")
    return (f"vae/: that build's weights with scaling_factor {now:.4f}, {b:g} times its {was:.4f} "
            f"(`--latent_scale {b:g}`): under the same schedule every noise level's SNR is {b * b:g} "
            "times what it was, so a latent is less decided at the few-step samplers' last "
            "timestep (t = 259). tokenizer/, scheduler/: that build's, unchanged.")


def write_finetune_readme(out_dir: str, base: str, teacher_cfg: dict, rows: list[dict],
                          times: dict, note: str, text_steps: int) -> None:
    text_line = (f"the previous build's, {text_encoder_note(out_dir)}" if not text_steps else
                 f"its cell-attribute probe pretraining continued for {text_steps} steps (lr "
                 f"{FINETUNE['text_lr']:g}) on captions that leave attributes out, the probe judging "
                 f"only what a caption states ({text_encoder_note(out_dir)})")
    def prompts(r):
        return "fully stated" if r["understated"] == 0 else f"{r['understated']:g} under-stated"

    table = "\n".join(
        f"| {prompts(r)} | {r['guidance_scale']} | {r['prompt_accuracy']:.3f} | {r['fd']:.2f} | "
        + " | ".join(f"{r.get('acc/' + k, float('nan')):.3f}"
                     for k in ("background", "shape", "color", "size", "position")) + " |"
        for r in rows)
    readme = FINETUNE_README.format(
        base=base, text_line=text_line, vae_line=vae_note(base, out_dir),
        teacher_steps=teacher_cfg["total_steps"],
        batch=teacher_cfg["batch_size"], teacher_lr=teacher_cfg["optim"]["learning_rate"],
        cache=teacher_cfg["data"]["cache_size"], ema=teacher_cfg.get("diffusion_ema_decay", 0.0),
        teacher_min=times.get("teacher", float("nan")) / 60, num_prompts=rows[0]["num_prompts"],
        table=table, note=f"\n{note}\n" if note else "")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(readme)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join("runs", "shapes_build"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--vae_steps", type=int, default=0, help="override lcm_jax/worlds/shapes/configs/shapes_vae.py")
    p.add_argument("--teacher_steps", type=int, default=0, help="override lcm_jax/worlds/shapes/configs/shapes_teacher.py")
    p.add_argument("--skip_training", action="store_true", help="reassemble from --workdir")
    p.add_argument("--guidance", default="3,5,7.5", help="comma-separated CFG scales to evaluate")
    p.add_argument("--num_prompts", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--note", default="", help="a paragraph appended to README.md (e.g. caveats)")
    p.add_argument("--from_teacher", default="", help="continue this teacher folder (see above)")
    p.add_argument("--text_steps", type=int, default=0,
                   help="--from_teacher: continue the text encoder's pretraining this many steps first")
    p.add_argument("--teacher_lr", type=float, default=0.0,
                   help=f"--from_teacher: peak learning rate (default {FINETUNE['teacher_lr']:g})")
    p.add_argument("--latent_scale", type=float, default=1.0,
                   help="--from_teacher: multiply the VAE's scaling_factor by this (scale_latents)")
    a = p.parse_args()
    if a.from_teacher:
        return main_finetune(a)

    vae_dir, teacher_dir = os.path.join(a.workdir, "vae"), os.path.join(a.workdir, "teacher")
    components = os.path.join(vae_dir, "components")
    times = {}
    if not a.skip_training:
        vae_args = ["-m", "lcm_jax.worlds.shapes.train_vae", f"--config={CONFIG_DIR}/shapes_vae.py", f"--workdir={vae_dir}"]
        times["vae"] = run_step(vae_args + ([f"--config.total_steps={a.vae_steps}"] if a.vae_steps else []))
        t_args = ["-m", "lcm_jax.train", f"--config={CONFIG_DIR}/shapes_teacher.py:{components}",
                  f"--workdir={teacher_dir}"]
        times["teacher"] = run_step(t_args + ([f"--config.total_steps={a.teacher_steps}"]
                                              if a.teacher_steps else []))
    out = os.path.abspath(a.out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    step = assemble(components, teacher_dir, tmp)
    print(f"assembled teacher at step {step} in {tmp}", flush=True)
    rows = evaluate_teacher(tmp, [float(g) for g in a.guidance.split(",")], a.num_prompts, a.steps,
                            os.path.join(tmp, "grid.png"))
    times.setdefault("teacher", logged_train_seconds(os.path.join(teacher_dir, "metrics.jsonl")))
    load = lambda path: json.load(open(path))
    teacher_cfg = load(os.path.join(teacher_dir, "config.json"))
    teacher_cfg["total_steps"] = step
    write_readme(tmp, load(os.path.join(vae_dir, "config.json")), load(os.path.join(vae_dir, "vae_eval.json")),
                 teacher_cfg, rows, times, a.note)
    with open(os.path.join(tmp, "eval.json"), "w") as f:
        json.dump({"ddim_cfg": rows, "train_seconds": times}, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} ({folder_size(out) / 1e6:.2f} MB)", flush=True)


def main_finetune(a) -> None:
    """--from_teacher: fine-tune, assemble, evaluate on fully stated and under-stated prompts."""
    from lcm_jax.worlds.shapes.world import UNDERSTATED

    teacher_dir = os.path.join(a.workdir, "teacher")
    times = {} if a.skip_training else finetune_steps(a.from_teacher, a.workdir, a.teacher_steps,
                                                      a.text_steps, a.latent_scale, a.teacher_lr)
    out = os.path.abspath(a.out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    step = assemble(os.path.join(a.workdir, "init"), teacher_dir, tmp)
    guidances = [float(g) for g in a.guidance.split(",")]
    rows = [r for rate in (0.0, UNDERSTATED) for r in evaluate_teacher(
        tmp, guidances, a.num_prompts, a.steps, os.path.join(tmp, "grid.png"), understated=rate)]
    times.setdefault("teacher", logged_train_seconds(os.path.join(teacher_dir, "metrics.jsonl")))
    with open(os.path.join(teacher_dir, "config.json")) as f:
        teacher_cfg = json.load(f)
    teacher_cfg["total_steps"] = step
    write_finetune_readme(tmp, a.from_teacher, teacher_cfg, rows, times, a.note, a.text_steps)
    with open(os.path.join(tmp, "eval.json"), "w") as f:
        json.dump({"ddim_cfg": rows, "train_seconds": times}, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out} ({folder_size(out) / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
