"""Building blocks shared by the UNet, the VAE and the text encoders (NHWC, linen).

Submodule names mirror the attribute names of diffusers/transformers PyTorch modules, with list
indices joined by an underscore (``resnets.0`` -> ``resnets_0``), so that weight conversion is a
mechanical renaming (see ``lcm_jax.convert.common``).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.models import accounting

Dtype = jnp.dtype

# ---------------------------------------------------------------------------------------------
# Attention: the one function every model calls, so the implementation can be swapped.
# ---------------------------------------------------------------------------------------------

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "blocked", "cudnn", "splash")
SPLASH_LANES = 128  # the TPU vector lane count: splash wants head_dim and token blocks in these


def _xla_attention(q, k, v, mask, scale):
    # (B, N, H, D) -> (B, H, N, D): batched matmuls with contiguous heads are ~2x faster on CPU.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return jnp.swapaxes(out, 1, 2)


def _chunked_attention(q, k, v, mask, scale, chunk: int = 1024):
    """Query-chunked attention: the same numbers as `_xla_attention` with a smaller score tensor."""
    n = q.shape[1]
    if mask is not None or n <= chunk or n % chunk:
        return _xla_attention(q, k, v, mask, scale)
    qc = q.reshape(q.shape[0], n // chunk, chunk, *q.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda qi: _xla_attention(qi, k, v, None, scale), qc)
    return out.swapaxes(0, 1).reshape(q.shape[:-1] + (v.shape[-1],))


def _blocked_attention(q, k, v, mask, scale, q_block: int = 512, k_block: int = 1024):
    """Flash-style attention: query blocks, and an online softmax over key blocks.

    Same numbers as `_xla_attention` up to float rounding (~1e-6 relative), but the score tensor
    is only (B, H, q_block, k_block), so it stays in cache: on CPU this is ~2x faster at 4096
    tokens, where the full (B, H, N, N) scores are memory bound.
    """
    b, n, h, d = q.shape
    m = k.shape[1]
    q_block, k_block = min(q_block, n), min(k_block, m)
    if mask is not None or n % q_block or m % k_block:
        return _xla_attention(q, k, v, mask, scale)
    qh = jnp.swapaxes(q, 1, 2) * jnp.asarray(scale, q.dtype)  # (B, H, N, D)
    kv_blocks = tuple(jnp.moveaxis(jnp.swapaxes(x, 1, 2).reshape(b, h, m // k_block, k_block, -1), 2, 0)
                      for x in (k, v))  # 2 x (nk, B, H, k_block, D)
    q_blocks = jnp.moveaxis(qh.reshape(b, h, n // q_block, q_block, d), 2, 0)
    out = jax.lax.map(lambda qb: _online_softmax_attention(qb, kv_blocks), q_blocks)
    return jnp.swapaxes(jnp.moveaxis(out, 0, 2).reshape(b, h, n, -1), 1, 2)  # (B, N, H, Dv)


def _online_softmax_attention(qb: jax.Array, kv_blocks: tuple[jax.Array, jax.Array]) -> jax.Array:
    """One (B, H, q_block, D) query block against keys/values scanned block by block."""
    dtype = kv_blocks[1].dtype

    def key_step(carry, kv):
        out, row_max, row_sum = carry
        scores = jnp.einsum("bhqd,bhkd->bhqk", qb, kv[0], preferred_element_type=jnp.float32)
        new_max = jnp.maximum(row_max, scores.max(-1, keepdims=True))
        probs, rescale = jnp.exp(scores - new_max), jnp.exp(row_max - new_max)
        pv = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), kv[1], preferred_element_type=jnp.float32)
        return (out * rescale + pv, new_max, row_sum * rescale + probs.sum(-1, keepdims=True)), None

    stats = qb.shape[:3] + (1,)
    init = (jnp.zeros(qb.shape[:3] + (kv_blocks[1].shape[-1],), jnp.float32),
            jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32))
    (out, _, row_sum), _ = jax.lax.scan(key_step, init, kv_blocks)
    return (out / row_sum).astype(dtype)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash_block(n: int) -> int:
    return next(b for b in (512, 256, SPLASH_LANES) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bkv = _splash_block(q_len), _splash_block(kv_len)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                           block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(heads)])
    return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, scale, interpret: bool):
    """Pallas splash attention (TPU; interpret mode elsewhere). Head dims the kernel cannot take
    (40, 80) are zero-padded to a multiple of 128 (exact: zeros add nothing to q.k, and the
    padded output columns are dropped) with the scale of the original head dim; token counts
    are padded to a multiple of 128, padded keys masked out by segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    (b, n, h, d), m, dv = q.shape, k.shape[1], v.shape[-1]
    dp, np_, mp = _round_up(max(d, dv), SPLASH_LANES), _round_up(n, SPLASH_LANES), _round_up(m, SPLASH_LANES)

    def heads_major(x, tokens):  # (B, T, H, D) -> (B, H, tokens, dp), zero-padded
        x = jnp.pad(x, ((0, 0), (0, tokens - x.shape[1]), (0, 0), (0, dp - x.shape[-1])))
        return jnp.swapaxes(x, 1, 2)

    q = q * jnp.asarray(scale, q.dtype)
    qh, kh, vh = heads_major(q, np_), heads_major(k, mp), heads_major(v, mp)
    segments = sk.SegmentIds(q=jnp.ones((b, np_), jnp.int32),
                             kv=jnp.broadcast_to((jnp.arange(mp) < m).astype(jnp.int32), (b, mp)))
    kernel = _splash_kernel(h, np_, mp, interpret)
    out = _over_batch_shards(lambda *a: jax.vmap(kernel)(*a), qh, kh, vh, segments)
    return jnp.swapaxes(out, 1, 2)[:, :n, :, :dv]


def _over_batch_shards(f, *args):
    """f on each device's examples (shard_map over every axis of the mesh in context): a Pallas
    kernel is not partitioned by XLA, so a batch split over the mesh is handed to it by hand."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return f(*args)
    spec = jax.sharding.PartitionSpec(mesh.axis_names)
    return jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(*args)


def _platform() -> str:
    """The platform being compiled for: the devices of the mesh in context (a TPU topology
    planned from a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: Optional[jax.Array] = None,
                          scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Softmax attention on (batch, tokens, heads, head_dim) arrays; softmax in float32.

    `mask` broadcasts to (batch, heads, q_tokens, k_tokens); True means "attend". `implementation`
    (a field of the model that calls this): 'auto' picks Pallas splash attention on TPU (when
    the batch divides the mesh in context), cuDNN flash attention on GPU (half precision),
    blocked attention on CPU for long sequences, and the XLA formulation elsewhere. On a TPU
    mesh, splash needs that mesh in context (`jax.set_mesh`) to split the batch over it.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} unknown; choose one of "
                         f"{ATTENTION_IMPLEMENTATIONS}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    impl = "xla" if accounting.on() else implementation  # kernels and loops hide their FLOPs
    if impl == "auto":
        impl = _auto_implementation(q, k, mask)
    if impl == "splash":
        if mask is not None:
            raise ValueError("attention implementation 'splash' takes no mask; use 'xla'")
        return _splash_attention(q, k, v, scale, interpret=_platform() != "tpu")
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    if impl == "chunked":
        return _chunked_attention(q, k, v, mask, scale)
    if impl == "blocked":
        return _blocked_attention(q, k, v, mask, scale)
    return _xla_attention(q, k, v, mask, scale)


def _auto_implementation(q: jax.Array, k: jax.Array, mask: Optional[jax.Array]) -> str:
    backend = _platform()
    if backend == "tpu":  # splash needs the batch split over the mesh in context, or one device
        mesh = jax.sharding.get_abstract_mesh()
        splits = jax.device_count() == 1 if mesh.empty else q.shape[0] % mesh.size == 0
        return "splash" if mask is None and splits else "xla"
    if backend == "gpu" and q.dtype != jnp.float32:
        return "cudnn"
    if backend == "cpu" and q.shape[1] * k.shape[1] >= 1024 * 1024:
        return "blocked"
    return "xla"


# ---------------------------------------------------------------------------------------------
# Normalisation and convolutions with PyTorch's numerics.
# ---------------------------------------------------------------------------------------------


def group_norm(num_groups: int, eps: float, dtype: Dtype = jnp.float32, name: Optional[str] = None):
    """GroupNorm matching torch.nn.GroupNorm (two-pass variance, statistics in float32)."""
    return GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)


class GroupNorm(nn.Module):
    """GroupNorm over (B, ..., C) with flax.linen.GroupNorm's parameters (`scale`, `bias`).

    Statistics in float32 with the two-pass variance, as torch. Each pass first sums every
    channel over the pixels (a reduction along the outer axis, which vectorises over the
    contiguous channels) and only then over the channels of a group: on CPU this is ~2x faster
    than reducing (pixels, channels-of-group) blocks directly at 512x512x128.
    """
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups")
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        xf = x.reshape(b, -1, c).astype(jnp.float32)
        count = xf.shape[1] * (c // g)
        per_channel = lambda t: jnp.repeat(t, c // g, axis=-1)[:, None, :]   # (B, G) -> (B, 1, C)
        group_sum = lambda t: t.sum(axis=1).reshape(b, g, c // g).sum(axis=-1)  # (B, N, C) -> (B, G)
        mean = per_channel(group_sum(xf) / count)
        var = group_sum(jnp.square(xf - mean)) / count
        y = (xf - mean) * per_channel(jax.lax.rsqrt(var + self.epsilon)) * scale + bias
        return y.reshape(x.shape).astype(self.dtype)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
         dtype: Dtype = jnp.float32, name: Optional[str] = None) -> "Conv2D":
    """A 2D convolution with PyTorch's symmetric padding (default: 'same' for odd kernels)."""
    p = kernel // 2 if padding is None else padding
    return Conv2D(features, kernel, stride, p, dtype=dtype, name=name)


class Conv2D(nn.Module):
    """NHWC convolution with flax.linen.Conv's parameters (`kernel` HWIO, `bias`) and init.

    On CPU, a 3x3 convolution over few pixels and many channels (the 8x8 and 16x16 levels of
    Stable Diffusion's UNet) runs as one matmul over the nine shifted copies of the input
    (im2col): XLA's direct convolution reaches a third of the matmul rate there, and its
    gradients even less. 1x1 convolutions are matmuls; everything else uses
    `lax.conv_general_dilated`.
    """
    features: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features),
                       jnp.float32)
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, w, b = nn.dtypes.promote_dtype(x, w, b, dtype=self.dtype)
        return conv2d(x, w, self.stride, self.padding) + b


def _im2col_wins(x: jax.Array, w: jax.Array, stride: int) -> bool:
    pixels = x.shape[0] * x.shape[1] * x.shape[2]
    return (jax.default_backend() == "cpu" and stride == 1 and w.shape[0] > 1
            and pixels <= 512 and x.shape[-1] >= 512)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 1) -> jax.Array:
    """(B, H, W, Cin) * (kh, kw, Cin, Cout) -> (B, H', W', Cout), zero padding on all sides."""
    if w.shape[:2] == (1, 1) and stride == 1 and padding == 0:
        return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])  # a 1x1 conv is a matmul (and faster as one)
    if _im2col_wins(x, w, stride):
        kh, kw, cin, cout = w.shape
        out_h, out_w = x.shape[1] + 2 * padding - kh + 1, x.shape[2] + 2 * padding - kw + 1
        xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        cols = jnp.concatenate([xp[:, i:i + out_h, j:j + out_w] for i in range(kh) for j in range(kw)], -1)
        return jnp.einsum("bhwk,ko->bhwo", cols, w.reshape(kh * kw * cin, cout))
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# ---------------------------------------------------------------------------------------------
# Timestep embeddings.
# ---------------------------------------------------------------------------------------------


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def guidance_scale_embedding(w: jax.Array, dim: int = 256) -> jax.Array:
    """Embedding of the guidance scale w (B,) -> (B, dim) used for LCM's `timestep_cond`.

    Same formula as the LCM reference code and diffusers' `get_guidance_scale_embedding`:
    w is scaled by 1000 and embedded with [sin, cos] at max period 10000.
    """
    w = jnp.asarray(w, jnp.float32) * 1000.0
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, with an optional bias-free `cond_proj` added to the input."""
    time_embed_dim: int
    out_dim: Optional[int] = None
    cond_proj_dim: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, condition: Optional[jax.Array] = None) -> jax.Array:
        if self.cond_proj_dim is not None:
            if condition is None:
                raise ValueError("this UNet has time_cond_proj_dim set: pass timestep_cond "
                                 "(the guidance-scale embedding), shape (batch, time_cond_proj_dim)")
            sample = sample + nn.Dense(sample.shape[-1], use_bias=False, dtype=self.dtype,
                                       name="cond_proj")(condition.astype(sample.dtype))
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = nn.silu(sample)
        return nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)


# ---------------------------------------------------------------------------------------------
# Convolutional blocks.
# ---------------------------------------------------------------------------------------------


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D ('default' time-embedding norm): GN-SiLU-conv, +temb, GN-SiLU-conv."""
    out_channels: int
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-6
    use_temb: bool = True
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None,
                 deterministic: bool = True) -> jax.Array:
        residual = x
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, name="norm1")(x))
        h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        if self.use_temb and temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups_out or self.groups, self.eps, self.dtype, name="norm2")(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if residual.shape[-1] != self.out_channels:
            residual = conv(self.out_channels, kernel=1, dtype=self.dtype, name="conv_shortcut")(residual)
        return (residual + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. `padding=0` is the VAE encoder's variant: pad right/bottom by one first."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, stride=2, padding=self.padding, dtype=self.dtype,
                    name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (2x, or to `output_size` as torch's interpolate) + 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
        b, h, w, c = x.shape
        if output_size is None or tuple(output_size) == (2 * h, 2 * w):
            x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        else:  # torch 'nearest': output pixel i reads input pixel floor(i * in / out)
            oh, ow = output_size
            x = x[:, (jnp.arange(oh) * h) // oh][:, :, (jnp.arange(ow) * w) // ow]
        return conv(self.out_channels, dtype=self.dtype, name="conv")(x)
