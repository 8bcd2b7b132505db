"""End-to-end few-step sampling: lcm-jax LCMPipeline vs diffusers LatentConsistencyModelPipeline.

    python tools/bench_sample.py --size 512 --repeats 3     # SD 1.5-sized, random weights
    python tools/bench_sample.py --size 256 --repeats 1     # a quick check that it runs
    python tools/bench_sample.py --tiny --size 64            # tiny random models (seconds)

Both pipelines get the same random-weight SD 1.5-sized folder (UNet 320/640/1280/1280 with
time_cond_proj_dim 256, CLIP ViT-L/14 text encoder, SD VAE), built with diffusers and saved to a
temporary folder, the same prompt, initial latents and re-noising draws, fp32. One sample is
text encoder + `--steps` UNet calls + VAE decode. Printed side by side: median latency, the
lcm-jax first call in a fresh compilation cache (cold: trace + XLA compile + run), and the first
call in a second process that reuses that persistent cache (warm
start; its overhead is that first call minus the same process's second), and max |image diff|.
Two more rows compare edits at the same draws: img2img (strength 0.5, as
LatentConsistencyModelImg2ImgPipeline) and ControlNet (a random ControlNetModel made from the
UNet's config, as StableDiffusionControlNetPipeline), median latency and max |image diff| each.
`--tiny` swaps in small random models of the same layout.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PROMPT = "a photograph of an astronaut riding a horse"
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, time_cond_proj_dim=256)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1)
# --tiny: the same architectures at toy widths
TINY_UNET = dict(UNET, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=8,
                 layers_per_block=1, time_cond_proj_dim=32)
TINY_VAE = dict(VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8)
TINY_CLIP = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, projection_dim=32)


# =============================================================================================
# The folder
# =============================================================================================


def write_tokenizer(folder: str) -> None:
    """The bundled CLIP-format tokenizer, padded to CLIP's 77 tokens (ids < 49408)."""
    from lcm_jax.worlds.shapes import TOKENIZER_DIR

    shutil.copytree(TOKENIZER_DIR, folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**cfg, "model_max_length": 77}, f)


def build_folder(folder: str, seed: int = 0, tiny: bool = False):
    """Random-weight SD 1.5-sized (or --tiny) LCM pipeline saved to `folder`; returns the
    diffusers pipeline."""
    import torch
    from diffusers import (AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    write_tokenizer(os.path.join(folder, "tokenizer"))
    unet, vae, clip = (TINY_UNET, TINY_VAE, TINY_CLIP) if tiny else (UNET, VAE, CLIP_L)
    pipe = LatentConsistencyModelPipeline(
        vae=AutoencoderKL(**vae).eval(), text_encoder=CLIPTextModel(CLIPTextConfig(**clip)).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        unet=UNet2DConditionModel(**unet).eval(),
        scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               set_alpha_to_one=True, timestep_spacing="leading", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


# =============================================================================================
# diffusers
# =============================================================================================


def run_diffusers(pipe, args, latents_nhwc: np.ndarray) -> tuple[list[float], np.ndarray, np.ndarray]:
    """(seconds per sample, images (1,H,W,3), the re-noising draws its scheduler made, NHWC)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(latents_nhwc.transpose(0, 3, 1, 2).copy())
    times, images = [], None
    for _ in range(args.repeats):
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            images = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=8.5,
                          height=args.size, width=args.size, latents=latents.to(device), generator=g,
                          output_type="np").images
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        print(f"  diffusers sample: {times[-1]:.2f}s", flush=True)
    g = torch.Generator().manual_seed(args.seed)
    noises = [torch.randn(latents.shape, generator=g).numpy().transpose(0, 2, 3, 1)
              for _ in range(args.steps)]
    return times, np.asarray(images, np.float32), np.stack(noises)


# =============================================================================================
# lcm-jax
# =============================================================================================


def jax_first_call(folder: str, cache: str, args, latents: np.ndarray, noises: np.ndarray) -> dict:
    """Load + first call in this process, with XLA compile seconds and persistent-cache hits."""
    from lcm_jax.compilation import CompileMeter, enable_compilation_cache
    from lcm_jax.pipeline import LCMPipeline

    enable_compilation_cache(cache)
    t0 = time.perf_counter()
    pipe = LCMPipeline.from_pretrained(folder)
    load_s = time.perf_counter() - t0
    meter = CompileMeter()
    t0 = time.perf_counter()
    images = sample_jax(pipe, args, latents, noises)
    d = meter.durations
    trace = sum(v for k, v in d.items() if k.endswith(("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")))
    return dict(pipe=pipe, images=images, load_s=load_s, first_s=time.perf_counter() - t0,
                compile_s=meter.seconds, cache_hits=meter.cache_hits, trace_s=trace,
                cache_load_s=sum(v for k, v in d.items() if "cache_retrieval" in k))


def sample_jax(pipe, args, latents: np.ndarray, noises: np.ndarray) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=8.5, height=args.size,
                width=args.size, latents=latents, noises=noises, seed=args.seed)


def run_jax(folder: str, cache: str, args, latents, noises) -> dict:
    print("lcm-jax: load + cold first call (fresh compilation cache) ...", flush=True)
    r = jax_first_call(folder, cache, args, latents, noises)
    print(f"  load {r['load_s']:.1f}s, first call {r['first_s']:.1f}s "
          f"(XLA compile {r['compile_s']:.1f}s)", flush=True)
    r["times"] = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r["images"] = sample_jax(r["pipe"], args, latents, noises)
        r["times"].append(time.perf_counter() - t0)
        print(f"  lcm-jax sample: {r['times'][-1]:.2f}s", flush=True)
    del r["pipe"]
    return r


def run_child(folder: str, cache: str, args, inputs: str) -> dict:
    """The warm start: a fresh process loads the folder and samples once from the shared cache."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", folder, "--cache", cache,
           "--inputs", inputs, "--size", str(args.size), "--steps", str(args.steps),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_main(args) -> None:
    data = np.load(args.inputs)
    r = jax_first_call(args.child, args.cache, args, data["latents"], data["noises"])
    t0 = time.perf_counter()
    sample_jax(r["pipe"], args, data["latents"], data["noises"])
    r["second_s"] = time.perf_counter() - t0
    print(json.dumps({k: r[k] for k in ("load_s", "first_s", "second_s", "compile_s", "cache_hits",
                                        "trace_s", "cache_load_s")}))


# =============================================================================================
# Edits: img2img and ControlNet, the same draws on both sides
# =============================================================================================


def _timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    """(median seconds of `repeats` calls after an untimed warm-up (compile), the last output)."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), np.asarray(out, np.float32)


def edit_rows(tpipe, folder: str, args) -> list[tuple]:
    """(name, diffusers s, lcm-jax s, max |image diff|) for img2img and ControlNet."""
    import torch
    from diffusers import (ControlNetModel, LatentConsistencyModelImg2ImgPipeline,
                           StableDiffusionControlNetPipeline)

    from lcm_jax.pipeline import LCMPipeline

    rng = np.random.default_rng(args.seed)
    image = rng.uniform(size=(1, args.size, args.size, 3)).astype(np.float32)
    torch.manual_seed(args.seed)
    cn = ControlNetModel.from_unet(tpipe.unet, load_weights_from_unet=False).eval()
    cn_dir = os.path.join(folder, "controlnet")
    cn.save_pretrained(cn_dir, safe_serialization=True)
    plain, pipe = LCMPipeline.from_pretrained(folder), LCMPipeline.from_pretrained(folder, controlnet=cn_dir)
    shape = (1, 4, args.size // 8, args.size // 8)
    steps = args.steps

    def draws(count):
        g = torch.Generator().manual_seed(args.seed)
        return [torch.randn(shape, generator=g).numpy().transpose(0, 2, 3, 1) for _ in range(count)]

    common = dict(num_inference_steps=steps, guidance_scale=8.5, output_type="np")
    i2i = LatentConsistencyModelImg2ImgPipeline.from_pipe(tpipe)
    cnp = StableDiffusionControlNetPipeline.from_pipe(tpipe, controlnet=cn)
    for p in (i2i, cnp):
        p.set_progress_bar_config(disable=True)
    rows = []
    posterior, noise, *noises = draws(2 + steps)
    with torch.no_grad():
        t_ref, ref = _timed(lambda: i2i(PROMPT, image=image, strength=0.5, **common,
                                        generator=torch.Generator().manual_seed(args.seed)).images, args.repeats)
    t_jax, ours = _timed(lambda: plain.img2img(PROMPT, image, strength=0.5, num_inference_steps=steps,
                                               guidance_scale=8.5, noise=noise, posterior_noise=posterior,
                                               noises=np.stack(noises)), args.repeats)
    rows.append((f"img2img, strength 0.5 (median of {args.repeats})", t_ref, t_jax, float(np.abs(ours - ref).max())))
    latents, *noises = draws(1 + steps)
    with torch.no_grad():
        t_ref, ref = _timed(lambda: cnp(PROMPT, image=image, height=args.size, width=args.size, **common,
                                        generator=torch.Generator().manual_seed(args.seed)).images, args.repeats)
    t_jax, ours = _timed(lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=8.5, height=args.size,
                                      width=args.size, latents=latents, noises=np.stack(noises), image=image),
                         args.repeats)
    rows.append((f"ControlNet (median of {args.repeats})", t_ref, t_jax, float(np.abs(ours - ref).max())))
    return rows


# =============================================================================================
# Main
# =============================================================================================


def print_table(args, torch_times, jax_r, child, max_diff, edits=()) -> None:
    import jax
    import torch

    t_torch, t_jax = statistics.median(torch_times), statistics.median(jax_r["times"])
    tdev = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = [
        (f"latency (median of {args.repeats})", f"{t_torch:.2f}s", f"{t_jax:.2f}s",
         f"{t_torch / t_jax:.2f}x"),
        ("load folder", "-", f"{jax_r['load_s']:.1f}s", ""),
        ("cold first call", "-", f"{jax_r['first_s']:.1f}s", ""),
        ("  of which XLA compile", "-", f"{jax_r['compile_s']:.1f}s", ""),
        ("warm start: load (new process)", "-", f"{child['load_s']:.1f}s", ""),
        ("warm start: first call", "-", f"{child['first_s']:.1f}s",
         f"{child['cache_hits']} cache hits"),
        ("  of which trace + lower", "-", f"{child['trace_s']:.1f}s", ""),
        ("  of which cache read", "-", f"{child['cache_load_s']:.1f}s", ""),
        ("warm start: second call", "-", f"{child['second_s']:.1f}s", ""),
        ("warm start overhead (1st - 2nd)", "-", f"{child['first_s'] - child['second_s']:.1f}s", ""),
    ] + [(name, f"{t_ref:.2f}s", f"{t_ours:.2f}s", f"{t_ref / t_ours:.2f}x (diff {diff:.1e})")
         for name, t_ref, t_ours, diff in edits]
    print(f"\n{args.steps}-step LCM sampling, {'tiny' if args.tiny else 'SD 1.5'} size, {args.size}x{args.size}, batch 1, fp32, "
          f"random weights; torch on {tdev}, jax on {jax.devices()[0].platform} "
          f"({jax.devices()[0].device_kind})")
    widths = (36, 20, 20, 16)
    header = ("", "diffusers (torch)", "lcm-jax", "diffusers/lcm-jax")
    for row in (header,) + tuple(rows):
        print("".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"max |image difference| (values in [0, 1]): {max_diff:.2e}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=512, help="image height = width, px")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed samples after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="toy-width random models of the same layout")
    p.add_argument("--keep", default="", help="build the folder here and keep it (else a temp dir)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    work = tempfile.mkdtemp(prefix="bench_sample_")
    folder = args.keep or os.path.join(work, "lcm_sd15_random")
    cache, inputs = os.path.join(work, "xla_cache"), os.path.join(work, "inputs.npz")
    try:
        print(f"building the {'tiny' if args.tiny else 'SD 1.5-sized'} random pipeline in {folder} ...", flush=True)
        tpipe = build_folder(folder, args.seed, args.tiny)
        latents = np.random.default_rng(args.seed).standard_normal(
            (1, args.size // 8, args.size // 8, 4)).astype(np.float32)
        print("diffusers (first call untimed: warm-up) ...", flush=True)
        run_diffusers(tpipe, argparse.Namespace(**{**vars(args), "repeats": 1}), latents)
        torch_times, torch_images, noises = run_diffusers(tpipe, args, latents)
        print("img2img and ControlNet, diffusers and lcm-jax ...", flush=True)
        edits = edit_rows(tpipe, folder, args)
        del tpipe
        gc.collect()
        np.savez(inputs, latents=latents, noises=noises)
        jax_r = run_jax(folder, cache, args, latents, noises)
        max_diff = float(np.abs(jax_r["images"] - torch_images).max())
        gc.collect()  # the weights of both pipelines are freed before the new process loads
        print("lcm-jax: warm start in a new process (same persistent cache) ...", flush=True)
        child = run_child(folder, cache, args, inputs)
        print_table(args, torch_times, jax_r, child, max_diff, edits)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
