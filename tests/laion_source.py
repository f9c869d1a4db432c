"""A LAION-layout CLAP checkpoint and an independent forward of it, for the conversion tests only.

The key names follow LAION-AI/CLAP's `htsat.py` and `model.py` (the module structure of `CLAP` with an
HTSAT audio branch and a RoBERTa text branch, saved from DistributedDataParallel: `module.` prefix). The
forward below computes LAION's audio embedding from those tensors with plain torch functions, so the
converted transformers model is compared against something that shares none of its code.
`laion_clap` itself cannot stand in: importing any of its modules runs its package `__init__`, which
imports librosa, torchvision, h5py, webdataset and torchlibrosa (and pins numpy < 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import RobertaConfig, RobertaModel

from audio_residual.clap.tiny import offline_tokenizer


@dataclass(frozen=True)
class Geometry:
    """An HTSAT as LAION builds it; the default is the toolkit's tiny test geometry (`tiny_clap_config`)."""

    embed: int = 16
    depths: tuple[int, ...] = (2, 1, 2, 1)
    heads: tuple[int, ...] = (2, 2, 4, 4)
    window: int = 4
    patch: int = 8
    mel: int = 64
    spec: int = 256
    joint: int = 32
    fusion: bool = False
    classes: int = 527

    @property
    def width(self) -> int:
        return self.embed * 2 ** (len(self.depths) - 1)


HTSAT_TINY = Geometry(embed=96, depths=(2, 2, 6, 2), heads=(4, 8, 16, 32), window=8, patch=4, joint=512)
HTSAT_BASE = Geometry(embed=128, depths=(2, 2, 12, 2), heads=(4, 8, 16, 32), window=8, patch=4, joint=512)


class _Random:
    """Weights at a scale where every mapping matters (unit-variance activations, non-trivial norms)."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def linear(self, state: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
        state[f"{name}.weight"] = self.normal(out, inp, std=inp**-0.5)
        if bias:
            state[f"{name}.bias"] = self.normal(out, std=0.1)

    def conv(self, state: dict, name: str, out: int, inp: int, kh: int, kw: int) -> None:
        state[f"{name}.weight"] = self.normal(out, inp, kh, kw, std=(inp * kh * kw) ** -0.5)
        state[f"{name}.bias"] = self.normal(out, std=0.1)

    def norm(self, state: dict, name: str, size: int) -> None:
        state[f"{name}.weight"] = 1 + self.normal(size, std=0.1)
        state[f"{name}.bias"] = self.normal(size, std=0.1)

    def batch_norm(self, state: dict, name: str, size: int) -> None:
        self.norm(state, name, size)
        state[f"{name}.running_mean"] = self.normal(size, std=0.1)
        state[f"{name}.running_var"] = 0.5 + torch.rand(size, generator=self.gen)
        state[f"{name}.num_batches_tracked"] = torch.tensor(1000)


def relative_position_index(window: int) -> torch.Tensor:
    """Swin's index into the bias table: (Δrow + w − 1) · (2w − 1) + (Δcol + w − 1) per token pair."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])
    delta = coords[:, :, None] - coords[:, None, :]
    return (delta[0] + window - 1) * (2 * window - 1) + (delta[1] + window - 1)


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) → (B · windows, window², C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def shift_mask(side: int, window: int, shift: int) -> torch.Tensor:
    """-100 between tokens of one shifted window that came from different regions of the unshifted grid."""
    regions = torch.zeros(1, side, side, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        regions[:, rows, cols, :] = label
    labels = _windows(regions, window).squeeze(-1)
    differs = labels[:, None, :] != labels[:, :, None]
    return torch.zeros(differs.shape).masked_fill(differs, -100.0)


def _audio_branch(rng: _Random, g: Geometry) -> dict:
    s: dict = {}
    a = "audio_branch."
    s[a + "spectrogram_extractor.stft.conv_real.weight"] = rng.normal(513, 1, 1024)
    s[a + "spectrogram_extractor.stft.conv_imag.weight"] = rng.normal(513, 1, 1024)
    s[a + "logmel_extractor.melW"] = rng.normal(513, g.mel).abs()
    rng.batch_norm(s, a + "bn0", g.mel)
    rng.conv(s, a + "patch_embed.proj", g.embed, 1, g.patch, g.patch)
    rng.norm(s, a + "patch_embed.norm", g.embed)
    if g.fusion:
        inter = g.embed // 4
        rng.conv(s, a + "patch_embed.mel_conv2d", g.embed, 1, g.patch, 3 * g.patch)
        for branch, first in (("local_att", 0), ("global_att", 1)):
            name = f"{a}patch_embed.fusion_model.{branch}."
            rng.conv(s, name + str(first), inter, g.embed, 1, 1)
            rng.batch_norm(s, name + str(first + 1), inter)
            rng.conv(s, name + str(first + 3), g.embed, inter, 1, 1)
            rng.batch_norm(s, name + str(first + 4), g.embed)
    side = g.spec // g.patch
    for i, (depth, heads) in enumerate(zip(g.depths, g.heads, strict=True)):
        dim, window = g.embed * 2**i, min(g.window, side)
        for j in range(depth):
            b = f"{a}layers.{i}.blocks.{j}."
            rng.norm(s, b + "norm1", dim)
            s[b + "attn.relative_position_bias_table"] = rng.normal((2 * window - 1) ** 2, heads)
            s[b + "attn.relative_position_index"] = relative_position_index(window)
            rng.linear(s, b + "attn.qkv", 3 * dim, dim)
            rng.linear(s, b + "attn.proj", dim, dim)
            rng.norm(s, b + "norm2", dim)
            rng.linear(s, b + "mlp.fc1", 4 * dim, dim)
            rng.linear(s, b + "mlp.fc2", dim, 4 * dim)
            if j % 2 == 1 and side > g.window:
                s[b + "attn_mask"] = shift_mask(side, window, window // 2)
        if i < len(g.depths) - 1:
            rng.linear(s, f"{a}layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            rng.norm(s, f"{a}layers.{i}.downsample.norm", 4 * dim)
            side //= 2
    rng.norm(s, a + "norm", g.width)
    freq_rows = g.spec // 2 ** (len(g.depths) - 1) // g.patch // (g.spec // g.mel)
    rng.conv(s, a + "tscam_conv", g.classes, g.width, max(freq_rows, 1), 3)
    rng.linear(s, a + "head", g.classes, g.classes)
    return s


def small_roberta(class_names, seed: int = 0) -> tuple[RobertaConfig, RobertaModel, object]:
    """A 2-layer RoBERTa and the offline tokenizer its vocabulary is sized to (RoBERTa's special tokens)."""
    tokenizer = offline_tokenizer(class_names)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=80, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = RobertaModel(config).eval()
    with torch.no_grad():  # RoBERTa's 0.02 init makes every prompt embed alike; widen it
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.dim() == 2:
                param.normal_(0.0, param.shape[1] ** -0.5 if "embeddings" not in name else 1.0)
    return config, model, tokenizer


def laion_checkpoint(g: Geometry, text_model: RobertaModel, seed: int = 0) -> dict:
    """What LAION's training saves: {"epoch", "name", "state_dict"} with `module.`-prefixed keys."""
    rng = _Random(seed)
    state = _audio_branch(rng, g)
    hidden = text_model.config.hidden_size
    for key, value in text_model.state_dict().items():
        state[f"text_branch.{key}"] = value.clone()
    state["text_branch.embeddings.position_ids"] = torch.arange(text_model.config.max_position_embeddings)[None]
    for branch, width in (("audio", g.width), ("text", hidden)):
        rng.linear(state, f"{branch}_projection.0", g.joint, width)
        rng.linear(state, f"{branch}_projection.2", g.joint, g.joint)
        rng.linear(state, f"{branch}_transform.sequential.0", g.joint, g.joint)
        rng.linear(state, f"{branch}_transform.sequential.3", g.joint, g.joint)
    state["logit_scale_a"] = torch.tensor(math.log(1 / 0.07))
    state["logit_scale_t"] = torch.tensor(math.log(1 / 0.05))
    return {"epoch": 15, "name": "test", "state_dict": {f"module.{k}": v for k, v in state.items()}}


# ---- LAION's forward, from its description, on the LAION tensors ------------------------------------------


def _ln(x, s, name):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], 1e-5)


def _linear(x, s, name):
    return F.linear(x, s[f"{name}.weight"], s.get(f"{name}.bias"))


def _bn(x, s, name):
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], training=False, eps=1e-5)


def _conv(x, s, name, stride=1):
    return F.conv2d(x, s[f"{name}.weight"], s[f"{name}.bias"], stride=stride)


def _to_image(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(B, C, T, F) mel → (B, C, spec, spec): time stretched to 4·256 frames, cut in 4 stacked chunks."""
    ratio = g.spec // g.mel
    x = F.interpolate(x, (g.spec * ratio, x.shape[3]), mode="bicubic", align_corners=True)
    b, c, t, f = x.shape
    x = x.permute(0, 1, 3, 2).reshape(b, c, f, ratio, t // ratio).permute(0, 1, 3, 2, 4)
    return x.reshape(b, c, ratio * f, t // ratio)


def _aff(x, residual, s, name):
    mixed = x + residual
    local = _bn(_conv(F.relu(_bn(_conv(mixed, s, f"{name}.local_att.0"), s, f"{name}.local_att.1")),
                      s, f"{name}.local_att.3"), s, f"{name}.local_att.4")
    pooled = mixed.mean(dim=(2, 3), keepdim=True)
    glob = _bn(_conv(F.relu(_bn(_conv(pooled, s, f"{name}.global_att.1"), s, f"{name}.global_att.2")),
                     s, f"{name}.global_att.4"), s, f"{name}.global_att.5")
    weight = torch.sigmoid(local + glob)
    return 2 * x * weight + 2 * residual * (1 - weight)


def _patch_embed(x, s, g, longer):
    a = "audio_branch.patch_embed."
    out = _conv(x[:, :1], s, a + "proj", stride=g.patch)
    if g.fusion and longer.any():
        idx = torch.where(longer)[0]
        local = x[idx, 1:]
        n, c, h, w = local.shape
        local = _conv(local.reshape(n * c, 1, h, w), s, a + "mel_conv2d", stride=(g.patch, 3 * g.patch))
        local = local.view(n, c, *local.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)
        width = out.shape[-1]
        local = F.pad(local, (0, max(0, width - local.shape[-1])))[..., :width]
        out = out.clone()
        out[idx] = _aff(out[idx], local, s, a + "fusion_model")
    return _ln(out.flatten(2).transpose(1, 2), s, a + "norm")


def _block(x, s, name, side, window, heads, shifted):
    b, n, c = x.shape
    shift = window // 2 if shifted and side > window else 0
    window = min(window, side)
    h = _ln(x, s, f"{name}.norm1").view(b, side, side, c)
    if shift:
        h = torch.roll(h, (-shift, -shift), (1, 2))
    w = _windows(h, window)
    tokens = window * window
    q, k, v = _linear(w, s, f"{name}.attn.qkv").view(-1, tokens, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    table = s[f"{name}.attn.relative_position_bias_table"]
    scores = scores + table[s[f"{name}.attn.relative_position_index"].flatten()].view(tokens, tokens, heads).permute(2, 0, 1)
    if shift:
        mask = s[f"{name}.attn_mask"]
        scores = (scores.view(b, mask.shape[0], heads, tokens, tokens) + mask[None, :, None]).view(-1, heads, tokens, tokens)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(-1, tokens, c)
    out = _linear(out, s, f"{name}.attn.proj").view(b, side // window, side // window, window, window, c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, side, side, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out.reshape(b, n, c)
    return x + _linear(F.gelu(_linear(_ln(x, s, f"{name}.norm2"), s, f"{name}.mlp.fc1")), s, f"{name}.mlp.fc2")


def _merge(x, s, name, side):
    b, _, c = x.shape
    x = x.view(b, side, side, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return _linear(_ln(x.view(b, -1, 4 * c), s, f"{name}.norm"), s, f"{name}.reduction")


def laion_audio_embedding(checkpoint: dict, g: Geometry, mel: torch.Tensor, longer: torch.Tensor) -> torch.Tensor:
    """LAION's `get_audio_embedding` on log-mel input (B, channels, 1001, 64): unit-norm joint embeddings."""
    s = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    x = _bn(mel.transpose(1, 3), s, "audio_branch.bn0").transpose(1, 3)
    x = _patch_embed(_to_image(x, g), s, g, longer)
    side = g.spec // g.patch
    for i, (depth, heads) in enumerate(zip(g.depths, g.heads, strict=True)):
        for j in range(depth):
            x = _block(x, s, f"audio_branch.layers.{i}.blocks.{j}", side, g.window, heads, j % 2 == 1)
        if i < len(g.depths) - 1:
            x = _merge(x, s, f"audio_branch.layers.{i}.downsample", side)
            side //= 2
    pooled = _ln(x, s, "audio_branch.norm").mean(1)
    return F.normalize(_linear(F.relu(_linear(pooled, s, "audio_projection.0")), s, "audio_projection.2"), dim=-1)


def laion_text_embedding(checkpoint: dict, text_model: RobertaModel, tokens: dict) -> torch.Tensor:
    """LAION's `get_text_embedding`: RoBERTa's pooler output through the text projection, unit norm."""
    s = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    pooled = text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(_linear(F.relu(_linear(pooled, s, "text_projection.0")), s, "text_projection.2"), dim=-1)
