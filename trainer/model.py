"""VMAs-style video→music model: Hiera features in, EnCodec tokens out (one file, nanoGPT style).

- `video_proj`: LayerNorm + Linear from the pre-extracted Hiera features to the model width, plus a
  learned position per frame.
- A decoder-only transformer over the 4 EnCodec codebooks laid out with MusicGen's delay pattern
  (codebook k is shifted right by k steps, so one position predicts all codebooks in parallel while
  codebook k still sees codebooks < k of the same audio frame). Each block: causal self-attention,
  cross-attention to the video, MLP.
- Loss (seed paper §4): beat-weighted cross-entropy (eq. 4) + λ · symmetric InfoNCE between mean-pooled
  video and a differentiable music embedding (eq. 2): softmax(logits) @ EnCodec codebook table, summed
  over codebooks (that is how residual VQ reconstructs a frame), mean-pooled over time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.timeline import STEPS


@dataclass
class ModelConfig:
    n_codebooks: int = 4
    codebook_size: int = 2048
    codebook_dim: int = 128  # EnCodec 32 kHz quantizer width; the contrastive music embedding lives there
    max_steps: int = STEPS  # audio frames per clip (50 Hz × 10 s); fitted to the data at train time
    video_dim: int = 768
    max_frames: int = 96
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    dropout: float = 0.0
    contrastive_weight: float = 0.1  # λ in L = L_ce + λ · L_contrastive
    contrastive_dim: int = 128
    contrastive_temperature: float = 0.07

    @property
    def special_token(self) -> int:
        """Id used for BOS and for the empty corners of the delay pattern."""
        return self.codebook_size

    @property
    def max_positions(self) -> int:
        return self.max_steps + self.n_codebooks - 1


# ---------------------------------------------------------------------------------------------------
# MusicGen delay pattern


def apply_delay(codes: torch.Tensor, fill: int | float) -> torch.Tensor:
    """[..., K, S] → [..., K, S+K-1]; row k shifted right by k, the rest filled with `fill`."""
    *lead, k_books, steps = codes.shape
    out = codes.new_full((*lead, k_books, steps + k_books - 1), fill)
    for k in range(k_books):
        out[..., k, k : k + steps] = codes[..., k, :]
    return out


def undo_delay(delayed: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_delay`: [..., K, S+K-1] → [..., K, S]."""
    k_books = delayed.shape[-2]
    steps = delayed.shape[-1] - k_books + 1
    return torch.stack([delayed[..., k, k : k + steps] for k in range(k_books)], dim=-2)


def delay_valid_mask(k_books: int, steps: int, device: torch.device | None = None) -> torch.Tensor:
    """[K, S+K-1] bool: True where the delayed layout holds a real token."""
    return apply_delay(torch.ones(k_books, steps, dtype=torch.bool, device=device), False)


# ---------------------------------------------------------------------------------------------------
# Losses


def beat_weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Eq. 4, normalised as sum(w · ce) / sum(w) over valid targets.

    Dividing by sum(w) rather than the token count keeps the loss on the plain-CE scale whatever λ_beat
    the shards were built with: weights change which frames matter, not the learning rate. With all
    weights 1 it is the ordinary mean cross-entropy.
    """
    ce = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    w = (weights * valid).flatten().float()
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def symmetric_info_nce(video: torch.Tensor, music: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2: CLIP-style loss over the batch; clip i's video and music are the positive pair."""
    video, music = F.normalize(video.float(), dim=-1), F.normalize(music.float(), dim=-1)
    logits = video @ music.t() / temperature
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


# ---------------------------------------------------------------------------------------------------
# Transformer


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.n_head, self.causal, self.dropout = cfg.n_head, causal, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        source = x if context is None else context
        q = self.q(x).view(b, t, self.n_head, -1).transpose(1, 2)
        k, v = self.kv(source).view(b, source.shape[1], 2, self.n_head, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_mlp = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn = Attention(cfg, causal=True)
        self.cross_attn = Attention(cfg, causal=False)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.ln_self(x))
        x = x + self.cross_attn(self.ln_cross(x), video)
        return x + self.mlp(self.ln_mlp(x))


def random_codebook_table(cfg: ModelConfig, seed: int = 0) -> torch.Tensor:
    """Stand-in for EnCodec's codebooks when its weights are not on this machine (stamped random-init)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.n_codebooks, cfg.codebook_size, cfg.codebook_dim, generator=gen)


class VideoToMusic(nn.Module):
    def __init__(self, cfg: ModelConfig, codebook_table: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.video_proj = nn.Sequential(nn.LayerNorm(cfg.video_dim), nn.Linear(cfg.video_dim, d))
        self.frame_pos = nn.Embedding(cfg.max_frames, d)
        self.token_emb = nn.ModuleList(nn.Embedding(cfg.codebook_size + 1, d) for _ in range(cfg.n_codebooks))
        self.step_pos = nn.Embedding(cfg.max_positions, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.heads = nn.ModuleList(
            nn.Linear(d, cfg.codebook_size, bias=False) for _ in range(cfg.n_codebooks)
        )
        self.video_to_joint = nn.Linear(d, cfg.contrastive_dim)
        self.music_to_joint = nn.Linear(cfg.codebook_dim, cfg.contrastive_dim)
        # Frozen EnCodec codebooks (a buffer, so it travels in the checkpoint and generate decodes with it).
        table = codebook_table if codebook_table is not None else random_codebook_table(cfg)
        self.register_buffer("codebook_table", table.float().clone())
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, T, D_video] → [B, T, d_model]."""
        positions = torch.arange(video.shape[1], device=video.device)
        return self.video_proj(video) + self.frame_pos(positions)

    def decode(self, delayed_inputs: torch.Tensor, video_ctx: torch.Tensor) -> torch.Tensor:
        """Delayed input tokens [B, K, L] → logits [B, K, L, V]."""
        positions = torch.arange(delayed_inputs.shape[-1], device=delayed_inputs.device)
        x = sum(emb(delayed_inputs[:, k]) for k, emb in enumerate(self.token_emb)) + self.step_pos(positions)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, video_ctx)
        x = self.ln_f(x)
        return torch.stack([head(x) for head in self.heads], dim=1)

    def music_embedding(self, logits: torch.Tensor) -> torch.Tensor:
        """Differentiable stand-in for 'embed the predicted tokens': expected codebook vector per slot."""
        probs = logits.float().softmax(dim=-1)  # [B, K, L, V]
        per_slot = torch.einsum("bklv,kve->bekl", probs, self.codebook_table)
        # undo_delay keeps only real slots; residual VQ reconstructs a frame as the sum over codebooks.
        frames = undo_delay(per_slot).sum(dim=2)  # [B, E, K, S] → [B, E, S]
        return frames.mean(dim=-1)

    def forward(
        self, tokens: torch.Tensor, video: torch.Tensor, beat_weights: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """tokens [B, K, S] long, video [B, T, D] float, beat_weights [B, S] → (loss, parts)."""
        k_books, steps = tokens.shape[1], tokens.shape[2]
        special = self.cfg.special_token
        targets = apply_delay(tokens, special)  # [B, K, L]
        bos = torch.full_like(targets[..., :1], special)
        inputs = torch.cat([bos, targets[..., :-1]], dim=-1)
        valid = delay_valid_mask(k_books, steps, tokens.device).expand_as(targets)
        weights = apply_delay(beat_weights.unsqueeze(1).expand(-1, k_books, -1), 0.0)

        video_ctx = self.encode_video(video)
        logits = self.decode(inputs, video_ctx)
        ce = beat_weighted_cross_entropy(logits, targets.clamp_max(self.cfg.codebook_size - 1), weights, valid)
        video_emb = self.video_to_joint(video_ctx.mean(dim=1))
        music_emb = self.music_to_joint(self.music_embedding(logits))
        contrastive = symmetric_info_nce(video_emb, music_emb, self.cfg.contrastive_temperature)
        loss = ce + self.cfg.contrastive_weight * contrastive
        return loss, {"ce": ce.detach(), "contrastive": contrastive.detach()}

    @torch.no_grad()
    def generate(
        self,
        video: torch.Tensor,
        steps: int,
        top_k: int = 250,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample tokens [B, K, steps] for video features [B, T, D] (no KV cache: nanoGPT-simple)."""
        k_books, special = self.cfg.n_codebooks, self.cfg.special_token
        valid = delay_valid_mask(k_books, steps, video.device)
        video_ctx = self.encode_video(video)
        delayed = torch.full((video.shape[0], k_books, 1), special, dtype=torch.long, device=video.device)
        for position in range(steps + k_books - 1):
            logits = self.decode(delayed, video_ctx)[:, :, -1].float() / max(temperature, 1e-5)
            next_tokens = sample_top_k(logits, top_k, generator)  # [B, K]
            next_tokens = torch.where(valid[:, position], next_tokens, special)
            delayed = torch.cat([delayed, next_tokens.unsqueeze(-1)], dim=-1)
        return undo_delay(delayed[..., 1:])


def sample_top_k(logits: torch.Tensor, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """logits [..., V] → one sampled id per row among the top_k most likely."""
    top_k = min(top_k, logits.shape[-1])
    values, indices = logits.topk(top_k, dim=-1)
    probs = values.softmax(dim=-1)
    choice = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(*probs.shape[:-1], 1)
    return indices.gather(-1, choice).squeeze(-1)


def count_params(cfg: ModelConfig) -> int:
    """Parameter count without allocating (meta device)."""
    with torch.device("meta"):
        return VideoToMusic(cfg, torch.empty(cfg.n_codebooks, cfg.codebook_size, cfg.codebook_dim)).num_params()

