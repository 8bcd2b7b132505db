"""One LCD training step (student fwd+bwd, teacher cond+uncond, EMA target fwd, AdamW, EMA update)
in lcm-jax and in diffusers PyTorch, side by side: examples/s and peak memory (process RSS).
Then the per-device bytes of params + Adam state + EMA target at SD 1.5 size on 1 and 8 devices.

    python tools/bench_train.py [--batch 4] [--latent 16] [--steps 5]

Each framework runs in its own subprocess so peak RSS is its own; both use the same UNet config.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

SMALL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=[64, 128, 128], attention_head_dim=8, cross_attention_dim=128,
                  norm_num_groups=32,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8,
                 cross_attention_dim=768, norm_num_groups=32,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
TEXT_LEN, W_DIM = 16, 256


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_jax(args) -> dict:
    import jax
    import ml_collections

    from lcm_jax import sharding, train
    from lcm_jax.defaults import base_config

    c = base_config()
    c.model.unet = ml_collections.ConfigDict(SMALL_UNET)
    c.model.time_cond_proj_dim = W_DIM
    c.batch_size, c.data.source = args.batch, "synthetic"
    c.data.latent_size, c.data.text_len = args.latent, TEXT_LEN
    c.optim.warmup_steps, c.loss.loss_type = 0, "huber"
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    s = train.setup(c, mesh)
    batch = sharding.shard_batch(s.source.batch(0), mesh)
    t0 = time.perf_counter()
    step = s.step_fn.lower(s.state, s.frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    state = s.state
    state, m = step(state, s.frozen, batch)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, s.frozen, batch)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"step_s": times[len(times) // 2], "compile_s": compile_s, "peak_rss_mb": peak_rss_mb()}


def run_torch(args) -> dict:
    import copy

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**SMALL_UNET).eval().requires_grad_(False)
    student = UNet2DConditionModel(**SMALL_UNET, time_cond_proj_dim=W_DIM)
    student.load_state_dict(teacher.state_dict(), strict=False)
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=1e-2)
    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    b, n = args.batch, args.latent
    z = torch.randn(b, 4, n, n)
    text = torch.randn(b, TEXT_LEN, SMALL_UNET["cross_attention_dim"])
    uncond = torch.randn(b, TEXT_LEN, SMALL_UNET["cross_attention_dim"])

    def w_embed(w):
        half = W_DIM // 2
        f = torch.exp(torch.arange(half) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        a = 1000.0 * w[:, None] * f[None]
        return torch.cat([torch.sin(a), torch.cos(a)], 1)

    def scalings(t):
        t = t.float() * 10.0
        return 0.25 / (t ** 2 + 0.25), t / (t ** 2 + 0.25) ** 0.5

    def f_theta(model, x, t, w_emb, a):
        eps = model(x, t, text, timestep_cond=w_emb).sample
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        cs, co = scalings(t)
        return cs[:, None, None, None] * x + co[:, None, None, None] * x0

    def step():
        t_start = torch.randint(0, 50, (b,)) * 20 + 19
        t_end = (t_start - 20).clamp(min=0)
        a_s, a_e = ac[t_start][:, None, None, None], ac[t_end][:, None, None, None]
        noise = torch.randn_like(z)
        x = a_s.sqrt() * z + (1 - a_s).sqrt() * noise
        w = torch.rand(b) * 10 + 5
        w_emb = w_embed(w)
        pred = f_theta(student, x, t_start, w_emb, a_s)
        with torch.no_grad():
            out = teacher(torch.cat([x, x]), torch.cat([t_start, t_start]), torch.cat([text, uncond])).sample
            e_c, e_u = out.chunk(2)
            x0_c, x0_u = [(x - (1 - a_s).sqrt() * e) / a_s.sqrt() for e in (e_c, e_u)]
            wb = w[:, None, None, None]
            x0, eps = x0_c + wb * (x0_c - x0_u), e_c + wb * (e_c - e_u)
            x_prev = a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps
            tgt = f_theta(target, x_prev, t_end, w_emb, a_e)
        loss = torch.mean(torch.sqrt((pred - tgt) ** 2 + 1e-6) - 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.mul_(0.95).add_(ps, alpha=0.05)
        return float(loss)

    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"step_s": times[len(times) // 2], "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def run_fsdp_bytes(_args) -> dict:
    import jax
    import optax

    from lcm_jax import sharding
    from lcm_jax.convert.unet import unet_shapes
    from lcm_jax.models.unet import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config({**SD15_UNET, "time_cond_proj_dim": W_DIM})
    params = unet_shapes(unet)
    tx = optax.adamw(1e-6)
    state = jax.eval_shape(lambda p: (p, tx.init(p), p), params)  # params, Adam, EMA target
    n_params = sum(x.size for x in jax.tree.leaves(params))
    out = {"n_params": int(n_params)}
    for n in (1, 8):
        mesh = sharding.make_mesh(1, n, jax.devices()[:n])
        sh = sharding.named(mesh, sharding.param_specs(state, mesh))
        out[f"bytes_{n}"] = sharding.per_device_bytes(state, sh)
    return out


def child(kind: str, args) -> dict:
    env = dict(os.environ)
    if kind == "fsdp":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch),
           "--latent", str(args.latent), "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{kind} benchmark failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--child", choices=["jax", "torch", "fsdp"])
    args = p.parse_args()
    if args.child:
        fn = {"jax": run_jax, "torch": run_torch, "fsdp": run_fsdp_bytes}[args.child]
        print(json.dumps(fn(args)))
        return
    print(f"LCD step, small SD-style UNet {SMALL_UNET['block_out_channels']}, batch {args.batch}, "
          f"{args.latent}x{args.latent} latents, fp32, median of {args.steps} steps", flush=True)
    print("running lcm-jax ...", flush=True)
    j = child("jax", args)
    print("running diffusers PyTorch ...", flush=True)
    t = child("torch", args)
    print(f"\n{'':22s}{'lcm-jax':>12s}{'PyTorch':>12s}{'ratio':>10s}")
    print(f"{'step time (s)':22s}{j['step_s']:12.3f}{t['step_s']:12.3f}{t['step_s'] / j['step_s']:9.2f}x")
    ej, et = args.batch / j["step_s"], args.batch / t["step_s"]
    print(f"{'examples/s':22s}{ej:12.2f}{et:12.2f}{ej / et:9.2f}x")
    print(f"{'peak RSS (MB)':22s}{j['peak_rss_mb']:12.0f}{t['peak_rss_mb']:12.0f}"
          f"{j['peak_rss_mb'] / t['peak_rss_mb']:9.2f}x")
    print(f"{'compile (s)':22s}{j['compile_s']:12.1f}{'-':>12s}")
    print("\nSD 1.5-size student: params + AdamW state + EMA target per device (from eval_shape):")
    f = child("fsdp", args)
    for n in (1, 8):
        print(f"  {n} device(s), fsdp={n}: {f[f'bytes_{n}'] / 2**30:7.2f} GiB "
              f"({f['n_params'] / 1e6:.0f}M params)")


if __name__ == "__main__":
    main()
