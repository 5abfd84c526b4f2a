"""U-Net denoisers of the official EDM checkpoints (Karras et al., 2022).

Two families are implemented:

* ``SongUNet``: DDPM++ / NCSN++ (Song et al., "Score-Based Generative Modeling through SDEs"),
  as re-implemented by NVlabs/edm.
* ``DhariwalUNet``: ADM (Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis").

Everything observable from outside is kept identical to the NVlabs code so that its checkpoints
load without conversion and produce the same numbers:

* constructor keyword names and defaults (checkpoints store the ``_init_kwargs`` that are passed
  straight back in; list defaults are written as tuples here, with the same values);
* state_dict keys, their order, shapes, dtypes and which buffers exist (a resampling filter is only
  registered on layers that actually resample);
* the forward arithmetic, operation for operation, so fp32 outputs on CPU are bit-identical;
* the order of random draws during initialisation, so a seeded model starts from the same weights.

Forward signature of both networks: ``forward(x, noise_labels, class_labels, augment_labels=None)``.
The embedding (mapping) path stays in the dtype of ``noise_labels`` (fp32 from the preconditioner)
while the image path runs in ``x.dtype`` (fp32, fp16 or bf16); weights are cast to the activation
dtype at use, never stored in reduced precision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.functional import silu

__all__ = [
    "NETWORKS",
    "LevelEmbedding",
    "Conv2d",
    "DhariwalUNet",
    "FourierEmbedding",
    "GroupNorm",
    "Linear",
    "PositionalEmbedding",
    "SongUNet",
    "UNetBlock",
    "attention_weights",
]


# ---------------------------------------------------------------------------------------------
# Initialisation


def _random_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """Draw an initial tensor; the modes and their gains match the NVlabs code's so that seeding
    the global RNG reproduces its initial weights."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}")


# ---------------------------------------------------------------------------------------------
# Layers


class Linear(nn.Module):
    """Fully connected layer whose weight is cast to the input dtype at call time."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans: dict[str, Any] = {"mode": init_mode, "fan_in": in_features, "fan_out": out_features}
        self.weight = nn.Parameter(_random_init([out_features, in_features], **fans) * init_weight)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(_random_init([out_features], **fans) * init_bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        # matmul followed by an in-place add (not F.linear/addmm): keeps the rounding identical.
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y.add_(self.bias.to(y.dtype))
        return y


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up- or downsampling by a separable FIR filter.

    ``kernel=0`` gives a pure resampling layer without weights. ``fused_resample`` folds the
    resampling into the convolution's padding/stride, which changes the result slightly, so it is
    a constructor choice and not an optimisation applied behind the caller's back.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ) -> None:
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample

        k2 = kernel * kernel
        fans: dict[str, Any] = {"mode": init_mode, "fan_in": in_channels * k2, "fan_out": out_channels * k2}
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if kernel:
            shape = [out_channels, in_channels, kernel, kernel]
            self.weight = nn.Parameter(_random_init(shape, **fans) * init_weight)
        else:
            self.register_parameter("weight", None)
        if kernel and bias:
            self.bias = nn.Parameter(_random_init([out_channels], **fans) * init_bias)
        else:
            self.register_parameter("bias", None)

        # Outer product of the 1-D taps, normalised to unit DC gain. Only layers that resample keep
        # it: a None buffer is left out of the state_dict, as in the official checkpoints.
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        fir = (taps.ger(taps) / taps.sum().square()).reshape(1, 1, len(taps), len(taps))
        self.resample_filter: Tensor | None
        self.register_buffer("resample_filter", fir if (up or down) else None)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        w = None if self.weight is None else self.weight.to(dtype)
        fir = None if self.resample_filter is None else self.resample_filter.to(dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if fir is None else (fir.shape[-1] - 1) // 2

        if w is not None and self.fused_resample and self.up:
            assert fir is not None
            # Upsampling kernel gains 4x so the transposed conv keeps the mean (stride 2 in 2-D).
            up_k = fir.mul(4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up_k, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif w is not None and self.fused_resample and self.down:
            assert fir is not None
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            down_k = fir.tile([self.out_channels, 1, 1, 1])
            x = F.conv2d(x, down_k, groups=self.out_channels, stride=2)
        else:
            if self.up:
                assert fir is not None
                up_k = fir.mul(4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up_k, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                assert fir is not None
                down_k = fir.tile([self.in_channels, 1, 1, 1])
                x = F.conv2d(x, down_k, groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)

        if self.bias is not None:
            x = x.add_(self.bias.to(dtype).reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.Module):
    """Group normalisation that never puts fewer than ``min_channels_per_group`` in a group."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(
            x, self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps
        )


def _attention_forward(q: Tensor, k: Tensor) -> Tensor:
    # 1/sqrt(C) is applied to k in its own dtype before the fp32 cast: that is where the
    # reference rounds, and bit-exactness depends on it.
    k_scaled = k / math.sqrt(k.shape[1])
    logits = torch.einsum("bci,bcj->bij", q.to(torch.float32), k_scaled.to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)


class _Fp32Attention(torch.autograd.Function):
    """Custom backward so that only q, k and the weights in the *input* dtype are kept for the
    backward pass (plain autograd would keep fp32 copies, doubling activation memory under fp16),
    and so that gradients round exactly like the reference's."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor) -> Tensor:
        weights = _attention_forward(q, k)
        ctx.save_for_backward(q, k, weights)
        return weights

    @staticmethod
    def backward(ctx: Any, grad_weights: Tensor) -> tuple[Tensor, Tensor]:
        q, k, weights = ctx.saved_tensors
        f32 = torch.float32
        grad_logits = torch.ops.aten._softmax_backward_data(grad_weights.to(f32), weights.to(f32), 2, f32)
        norm = math.sqrt(k.shape[1])
        grad_q = torch.einsum("bcj,bij->bci", k.to(f32), grad_logits).to(q.dtype) / norm
        grad_k = torch.einsum("bci,bij->bcj", q.to(f32), grad_logits).to(k.dtype) / norm
        return grad_q, grad_k


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q^T k / sqrt(C)) over keys, for q, k of shape [N, C, L]; returns [N, L, L].

    The product and the softmax are evaluated in fp32 whatever the input dtype (fp16 logits
    overflow); the weights come back in ``q.dtype``.
    """
    return _Fp32Attention.apply(q, k)


class LevelEmbedding:
    """An embedding that depends on the noise level alone: one [1, C] row per distinct level.

    The reference calls the network with one noise level for the whole batch, so the layers that
    see only that level (the mapping network, and each block's affine layer when nothing per
    image is added) run on a batch of one. When the rows of a batch are at different levels (step
    batching), each distinct level is computed the same way, on a batch of one, and the rows are
    gathered afterwards: every row gets the reference's numbers whatever shares its forward pass
    (a matmul rounds differently for other batch sizes).
    """

    def __init__(self, levels: list[Tensor], index: Tensor) -> None:
        self.levels = levels  # [1, C] each
        self.index = index    # [B] or [1]: the level of each row

    @staticmethod
    def of(noise_labels: Tensor, embed: Callable[[Tensor], Tensor]) -> LevelEmbedding:
        values, index = noise_labels.unique(return_inverse=True)
        return LevelEmbedding([embed(values[k:k + 1]) for k in range(len(values))], index)

    def map(self, layer: Callable[[Tensor], Tensor]) -> LevelEmbedding:
        return LevelEmbedding([layer(level) for level in self.levels], self.index)

    def rows(self) -> Tensor:
        return self.levels[0] if len(self.index) == 1 else torch.cat(self.levels)[self.index]


Embedding = Tensor | LevelEmbedding


class UNetBlock(nn.Module):
    """Residual block shared by DDPM++, NCSN++ and ADM, with optional resampling and attention.

    The embedding either shifts the normalised activations (``adaptive_scale=False``, DDPM++ and
    NCSN++) or scales and shifts them (ADM). Attention uses ``num_heads`` if given, otherwise
    ``out_channels // channels_per_head`` heads.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0,
        skip_scale: float = 1,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: Mapping[str, Any] | None = None,
        init_zero: Mapping[str, Any] | None = None,
        init_attn: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # None stands for the reference's dict defaults (immutable-default hygiene).
        conv_init: dict[str, Any] = {} if init is None else dict(init)
        zero_init: dict[str, Any] = {"init_weight": 0} if init_zero is None else dict(init_zero)
        qkv_init = conv_init if init_attn is None else dict(init_attn)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        # Registration order below fixes the state_dict order and the RNG draw order.
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **conv_init
        )
        affine_out = out_channels * 2 if adaptive_scale else out_channels
        self.affine = Linear(emb_channels, affine_out, **conv_init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **zero_init)

        self.skip: Conv2d | None = None
        if in_channels != out_channels or up or down:
            # Channel changes always need a 1x1 projection; pure resampling only if asked for.
            proj = resample_proj or in_channels != out_channels
            self.skip = Conv2d(
                in_channels,
                out_channels,
                kernel=1 if proj else 0,
                up=up,
                down=down,
                resample_filter=resample_filter,
                **conv_init,
            )

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **zero_init)

    def forward(self, x: Tensor, emb: Embedding) -> Tensor:
        residual = x
        h = self.conv0(silu(self.norm0(x)))

        affine = self.affine(emb) if isinstance(emb, Tensor) else emb.map(self.affine).rows()
        cond = affine.unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = cond.chunk(chunks=2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = silu(self.norm1(h.add_(cond)))

        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = h.add_(residual if self.skip is None else self.skip(residual))
        h = h * self.skip_scale

        if self.num_heads:
            batch, channels = h.shape[0], h.shape[1]
            # qkv channels are laid out per head as [head, channel, (q|k|v)].
            qkv = self.qkv(self.norm2(h)).reshape(batch * self.num_heads, channels // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            attn = attention_weights(q, k)
            mixed = torch.einsum("bij,bcj->bci", attn, v)
            h = self.proj(mixed.reshape(*h.shape)).add_(h)
            h = h * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (DDPM++ and ADM); output is [cos | sin]."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        # With endpoint=True the last frequency is exactly 1/max_positions.
        exponents = exponents / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        angles = x.ger(freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar per sample (NCSN++); output is [cos | sin].

    The frequencies are a persistent buffer: they are part of the checkpoint.
    """

    def __init__(self, num_channels: int, scale: float = 16) -> None:
        super().__init__()
        self.freqs: Tensor
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = x.ger((2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def _drop_labels(labels: Tensor, p: float, like: Tensor, training: bool) -> Tensor:
    """Zero whole label vectors with probability ``p`` while training (classifier-free guidance).

    ``like`` is the image batch: it gives the batch size and the device of the random draw."""
    if not (training and p):
        return labels
    keep = torch.rand([like.shape[0], 1], device=like.device) >= p
    return labels * keep.to(labels.dtype)


# ---------------------------------------------------------------------------------------------
# DDPM++ / NCSN++

_ENCODERS = ("standard", "skip", "residual")
_DECODERS = ("standard", "skip")
_EMBEDDINGS = ("positional", "fourier")


class SongUNet(nn.Module):
    """DDPM++ (``embedding_type='positional'``, standard encoder, filter [1,1]) and NCSN++
    (``'fourier'``, ``channel_mult_noise=2``, residual encoder, filter [1,3,3,1]) U-Nets.

    Encoder/decoder modules live in two ``ModuleDict``s whose names (``'32x32_block0'``,
    ``'16x16_aux_residual'`` ...) are the checkpoint's keys; the role of each entry is recorded at
    construction so the forward pass does not depend on parsing those names.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        if embedding_type not in _EMBEDDINGS:
            raise ValueError(f"embedding_type must be one of {_EMBEDDINGS}, got {embedding_type!r}")
        if encoder_type not in _ENCODERS:
            raise ValueError(f"encoder_type must be one of {_ENCODERS}, got {encoder_type!r}")
        if decoder_type not in _DECODERS:
            raise ValueError(f"decoder_type must be one of {_DECODERS}, got {decoder_type!r}")
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout

        emb_ch = model_channels * channel_mult_emb
        noise_ch = model_channels * channel_mult_noise
        init: dict[str, Any] = {"init_mode": "xavier_uniform"}
        # Output-side layers start near (not exactly at) zero in DDPM++/NCSN++.
        init_zero: dict[str, Any] = {"init_mode": "xavier_uniform", "init_weight": 1e-5}
        init_attn: dict[str, Any] = {"init_mode": "xavier_uniform", "init_weight": math.sqrt(0.2)}
        block_args: dict[str, Any] = {
            "emb_channels": emb_ch,
            "num_heads": 1,
            "dropout": dropout,
            "skip_scale": math.sqrt(0.5),
            "eps": 1e-6,
            "resample_filter": resample_filter,
            "resample_proj": True,
            "adaptive_scale": False,
            "init": init,
            "init_zero": init_zero,
            "init_attn": init_attn,
        }

        # Mapping network: noise level (+ class, + augmentation) -> emb_ch vector.
        self.map_noise: nn.Module
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_ch, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_ch)
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        # Encoder. `aux_ch` tracks the channels of the auxiliary (image pyramid) path.
        self.enc = nn.ModuleDict()
        enc_roles: list[str] = []

        def add_enc(name: str, module: nn.Module, role: str) -> None:
            self.enc[name] = module
            enc_roles.append(role)

        ch = in_channels
        aux_ch = in_channels
        skip_chs: list[int] = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                # The stem has model_channels outputs regardless of channel_mult[0].
                add_enc(f"{tag}_conv", Conv2d(ch, model_channels, kernel=3, **init), "conv")
                ch = model_channels
                skip_chs.append(ch)
            else:
                add_enc(f"{tag}_down", UNetBlock(ch, ch, down=True, **block_args), "block")
                skip_chs.append(ch)
                if encoder_type == "skip":
                    aux_down = Conv2d(aux_ch, aux_ch, kernel=0, down=True, resample_filter=resample_filter)
                    add_enc(f"{tag}_aux_down", aux_down, "aux_down")
                    add_enc(f"{tag}_aux_skip", Conv2d(aux_ch, ch, kernel=1, **init), "aux_skip")
                elif encoder_type == "residual":
                    aux_res = Conv2d(
                        aux_ch,
                        ch,
                        kernel=3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    add_enc(f"{tag}_aux_residual", aux_res, "aux_residual")
                    aux_ch = ch
            for idx in range(num_blocks):
                out_ch = model_channels * mult
                block = UNetBlock(ch, out_ch, attention=res in attn_resolutions, **block_args)
                add_enc(f"{tag}_block{idx}", block, "block")
                ch = out_ch
                skip_chs.append(ch)
        self._enc_roles = tuple(enc_roles)

        # Decoder. Every `_block{idx}` concatenates one encoder output (popped in reverse).
        self.dec = nn.ModuleDict()
        dec_roles: list[str] = []

        def add_dec(name: str, module: nn.Module, role: str) -> None:
            self.dec[name] = module
            dec_roles.append(role)

        last_level = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last_level:
                add_dec(f"{tag}_in0", UNetBlock(ch, ch, attention=True, **block_args), "block")
                add_dec(f"{tag}_in1", UNetBlock(ch, ch, **block_args), "block")
            else:
                add_dec(f"{tag}_up", UNetBlock(ch, ch, up=True, **block_args), "block")
            for idx in range(num_blocks + 1):
                out_ch = model_channels * mult
                # Only the last block of a level attends (as in score_sde).
                attn = idx == num_blocks and res in attn_resolutions
                block = UNetBlock(ch + skip_chs.pop(), out_ch, attention=attn, **block_args)
                add_dec(f"{tag}_block{idx}", block, "concat_block")
                ch = out_ch
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last_level:
                    aux_up = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                    add_dec(f"{tag}_aux_up", aux_up, "aux_up")
                add_dec(f"{tag}_aux_norm", GroupNorm(ch, eps=1e-6), "aux_norm")
                add_dec(f"{tag}_aux_conv", Conv2d(ch, out_channels, kernel=3, **init_zero), "aux_conv")
        self._dec_roles = tuple(dec_roles)

    def _embed(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> Embedding:
        per_image = self.map_label is not None or (self.map_augment is not None and augment_labels is not None)
        if not (per_image or self.training):
            return LevelEmbedding.of(noise_labels, self._embed_noise)
        emb = self._noise_features(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("class_labels are required by a class-conditional network")
            labels = _drop_labels(class_labels, self.label_dropout, x, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return self._map(emb)

    def _noise_features(self, noise_labels: Tensor) -> Tensor:
        emb = self.map_noise(noise_labels)
        # score_sde orders the features [sin | cos]; swap the two halves.
        return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)

    def _map(self, emb: Tensor) -> Tensor:
        return silu(self.map_layer1(silu(self.map_layer0(emb))))

    def _embed_noise(self, noise_labels: Tensor) -> Tensor:
        return self._map(self._noise_features(noise_labels))

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        emb = self._embed(x, noise_labels, class_labels, augment_labels)

        skips: list[Tensor] = []
        aux = x
        for role, layer in zip(self._enc_roles, self.enc.values(), strict=True):
            if role == "aux_down":
                aux = layer(aux)
            elif role == "aux_skip":
                x = x + layer(aux)
                skips[-1] = x
            elif role == "aux_residual":
                x = (x + layer(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            elif role == "conv":
                x = layer(x)
                skips.append(x)
            else:
                x = layer(x, emb)
                skips.append(x)

        out: Tensor | None = None
        normed: Tensor | None = None
        for role, layer in zip(self._dec_roles, self.dec.values(), strict=True):
            if role == "aux_up":
                out = layer(out)
            elif role == "aux_norm":
                normed = layer(x)
            elif role == "aux_conv":
                assert normed is not None
                head = layer(silu(normed))
                out = head if out is None else head + out
            else:
                if role == "concat_block":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        assert out is not None
        return out


# ---------------------------------------------------------------------------------------------
# ADM


class DhariwalUNet(nn.Module):
    """ADM U-Net (guided-diffusion), as used by the ImageNet-64 checkpoints.

    Attention heads have 64 channels each; the class embedding is added after the mapping MLP.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0,
    ) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout

        emb_ch = model_channels * channel_mult_emb
        gain = math.sqrt(1 / 3)
        init: dict[str, Any] = {"init_mode": "kaiming_uniform", "init_weight": gain, "init_bias": gain}
        # ADM zero-initialises its output-side layers exactly.
        init_zero: dict[str, Any] = {"init_mode": "kaiming_uniform", "init_weight": 0, "init_bias": 0}
        block_args: dict[str, Any] = {
            "emb_channels": emb_ch,
            "channels_per_head": 64,
            "dropout": dropout,
            "init": init,
            "init_zero": init_zero,
        }

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        # Unit-variance output for one-hot labels.
        label_init: dict[str, Any] = {"init_mode": "kaiming_normal", "init_weight": math.sqrt(label_dim)}
        self.map_label = Linear(label_dim, emb_ch, bias=False, **label_init) if label_dim else None

        self.enc = nn.ModuleDict()
        skip_chs: list[int] = []
        ch = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = Conv2d(ch, model_channels * mult, kernel=3, **init)
                ch = model_channels * mult
            else:
                self.enc[f"{tag}_down"] = UNetBlock(ch, ch, down=True, **block_args)
            skip_chs.append(ch)
            for idx in range(num_blocks):
                out_ch = model_channels * mult
                self.enc[f"{tag}_block{idx}"] = UNetBlock(ch, out_ch, attention=res in attn_resolutions, **block_args)
                ch = out_ch
                skip_chs.append(ch)

        # Decoder: each `_block{idx}` concatenates one encoder output; in0/in1/up do not.
        self.dec = nn.ModuleDict()
        concat: list[bool] = []
        last_level = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last_level:
                self.dec[f"{tag}_in0"] = UNetBlock(ch, ch, attention=True, **block_args)
                self.dec[f"{tag}_in1"] = UNetBlock(ch, ch, **block_args)
                concat += [False, False]
            else:
                self.dec[f"{tag}_up"] = UNetBlock(ch, ch, up=True, **block_args)
                concat.append(False)
            for idx in range(num_blocks + 1):
                out_ch = model_channels * mult
                self.dec[f"{tag}_block{idx}"] = UNetBlock(
                    ch + skip_chs.pop(), out_ch, attention=res in attn_resolutions, **block_args
                )
                concat.append(True)
                ch = out_ch
        self._dec_concat = tuple(concat)
        self.out_norm = GroupNorm(ch)
        self.out_conv = Conv2d(ch, out_channels, kernel=3, **init_zero)

    def _embed(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> Embedding:
        # The class is added after the mapping MLP, which sees the noise level (and augmentation) only.
        noise: Embedding
        if self.map_augment is not None and augment_labels is not None:
            noise = self._map(self.map_noise(noise_labels) + self.map_augment(augment_labels))
        elif self.training:
            noise = self._map(self.map_noise(noise_labels))
        else:
            noise = LevelEmbedding.of(noise_labels, lambda level: self._map(self.map_noise(level)))
        if self.map_label is None:
            return silu(noise) if isinstance(noise, Tensor) else noise.map(silu)
        if class_labels is None:
            raise ValueError("class_labels are required by a class-conditional network")
        labels = _drop_labels(class_labels, self.label_dropout, x, self.training)
        return silu((noise if isinstance(noise, Tensor) else noise.rows()) + self.map_label(labels))

    def _map(self, emb: Tensor) -> Tensor:
        return self.map_layer1(silu(self.map_layer0(emb)))

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        emb = self._embed(x, noise_labels, class_labels, augment_labels)

        skips: list[Tensor] = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)

        for takes_skip, layer in zip(self._dec_concat, self.dec.values(), strict=True):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


# Name -> class, as stored in checkpoints' `model_type`; an explicit table, so that a pickle or a
# card can only ever select one of these two classes.
NETWORKS: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
