"""Parameter decoder F (phi_q): meta-encoder state h_i -> query-specific LoRA factors for the actor.

For every target Linear of the actor, F emits A_i [r, in] and B_i [out, r] with two small MLPs of
the paper's form MM(ReLU(MM(W_d, h)), W_u), one for the A side and one for the B side.

    h = pool(G.encode(ids, mask), mask)          # [B, d_G]
    factors = decoder(h)                          # {"7.q_proj": (A [B, r, in], B [B, out, r]), ...}
    with actor_lora.use_factors(factors): ...

Choices the paper leaves open (ours):
- h is LayerNorm-ed at F's input, so its scale does not depend on the generator's depth k.
- heads="shared": one trunk per side whose input is [h; layer embedding; module embedding]
  (the first matmul is split as W_h h + W_e [e_layer; e_module]), then one output layer per
  module type, since in/out sizes differ per type. heads="per_target": one MLP per target.
- The B side's output layer starts at zero, so dW = B A = 0 at step 0 (actor unchanged); the A
  side's output layer starts small and random, so A ~ 1/sqrt(in) as in PEFT's LoRA init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from metatuner.errors import MetatunerError
from metatuner.lora import TargetSpec

POOLING = ("mean", "last")
HEADS = ("shared", "per_target")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool token states over the non-pad tokens.  hidden: [B, T, d], attention_mask: [B, T] -> [B, d].

    mean: masked mean. last: the last non-pad token (works for left and right padding).
    """
    if mode not in POOLING:
        raise MetatunerError(f"hypernet.pooling must be one of {', '.join(POOLING)}, got {mode!r}")
    mask = attention_mask.to(hidden.device)
    if mode == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (positions * (mask > 0)).argmax(dim=1)  # [B]: highest position with mask 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _group_name(t: TargetSpec) -> str:
    """Output heads are shared by targets of the same module name and shape."""
    return f"{t.module}_{t.in_features}x{t.out_features}"


def _init_out(linear: nn.Linear, side: str, fan_in: int, hidden: int) -> None:
    """B side: zeros (dW = 0 at step 0). A side: entries of A come out with std ~ 1/sqrt(fan_in)."""
    nn.init.zeros_(linear.bias)
    if side == "B":
        nn.init.zeros_(linear.weight)
    else:
        # ReLU features of a LayerNorm-ed input through a default Linear have rms ~0.4.
        nn.init.normal_(linear.weight, std=2.5 / math.sqrt(hidden * fan_in))


class _SharedSide(nn.Module):
    """One side (A or B) of the shared design: trunk W_d over [h; e_layer; e_module], ReLU, per-type W_u."""

    def __init__(self, in_dim: int, embed_dim: int, hidden: int, groups: dict[str, TargetSpec], rank: int, side: str):
        super().__init__()
        self.side = side
        self.rank = rank
        self.w_h = nn.Linear(in_dim, hidden)
        self.w_e = nn.Linear(2 * embed_dim, hidden, bias=False)
        self.heads = nn.ModuleDict()
        for name, t in groups.items():
            size = rank * (t.in_features if side == "A" else t.out_features)
            self.heads[name] = nn.Linear(hidden, size)
            _init_out(self.heads[name], side, t.in_features, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, groups: dict[str, list[int]], targets: list[TargetSpec]):
        """h: [B, in_dim], emb: [n_targets, 2*embed_dim] -> list of per-target factors (A or B)."""
        z = torch.relu(self.w_h(h).unsqueeze(1) + self.w_e(emb).unsqueeze(0))  # [B, n_targets, hidden]
        out: list[torch.Tensor | None] = [None] * len(targets)
        for name, idx in groups.items():
            flat = self.heads[name](z[:, idx])  # [B, n_group, r*in] or [B, n_group, out*r]
            for j, i in enumerate(idx):
                t = targets[i]
                shape = (self.rank, t.in_features) if self.side == "A" else (t.out_features, self.rank)
                out[i] = flat[:, j].reshape(-1, *shape)
        return out


def _mlp(in_dim: int, hidden: int, out_dim: int, side: str, fan_in: int) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
    _init_out(net[2], side, fan_in, hidden)
    return net


class ParameterDecoder(nn.Module):
    """F: pooled meta-encoder state [B, in_dim] -> {target key: (A [B, r, in], B [B, out, r])}.

    in_dim is the generator's width; the targets' sizes are the actor's (they may differ).
    The factors are unscaled; PerQueryLoRA applies s = alpha / rank (alpha is kept here so a
    checkpoint records it).
    """

    def __init__(
        self,
        in_dim: int,
        targets: list[TargetSpec],
        rank: int,
        alpha: float,
        hidden: int = 64,
        heads: str = "shared",
        embed_dim: int = 32,
    ):
        super().__init__()
        if rank <= 0:
            raise MetatunerError(f"lora.rank must be > 0, got {rank}")
        if hidden <= 0:
            raise MetatunerError(f"hypernet.hidden must be > 0, got {hidden}")
        if heads not in HEADS:
            raise MetatunerError(f"hypernet.heads must be one of {', '.join(HEADS)}, got {heads!r}")
        if heads == "shared" and embed_dim <= 0:
            raise MetatunerError(f"hypernet.embed_dim must be > 0, got {embed_dim}")
        if in_dim <= 0:
            raise MetatunerError(f"parameter decoder input width must be > 0, got {in_dim}")
        if not targets:
            raise MetatunerError("lora.target_modules selects no module")
        self.in_dim, self.rank, self.alpha = int(in_dim), int(rank), float(alpha)
        self.hidden, self.heads, self.embed_dim = int(hidden), heads, int(embed_dim)
        self.targets = list(targets)
        self.norm = nn.LayerNorm(in_dim)

        if heads == "shared":
            layers = sorted({t.layer for t in targets})
            modules = sorted({t.module for t in targets})
            self.register_buffer("layer_ids", torch.tensor([layers.index(t.layer) for t in targets]), persistent=False)
            self.register_buffer("module_ids", torch.tensor([modules.index(t.module) for t in targets]), persistent=False)
            self.layer_emb = nn.Embedding(len(layers), embed_dim)
            self.module_emb = nn.Embedding(len(modules), embed_dim)
            nn.init.normal_(self.layer_emb.weight, std=1.0)
            nn.init.normal_(self.module_emb.weight, std=1.0)
            first: dict[str, TargetSpec] = {}
            self._groups: dict[str, list[int]] = {}
            for i, t in enumerate(targets):
                first.setdefault(_group_name(t), t)
                self._groups.setdefault(_group_name(t), []).append(i)
            self.side_a = _SharedSide(in_dim, embed_dim, hidden, first, rank, "A")
            self.side_b = _SharedSide(in_dim, embed_dim, hidden, first, rank, "B")
        else:
            name = lambda t: t.key.replace(".", "_")  # noqa: E731 (ModuleDict keys cannot hold dots)
            self.mlp_a = nn.ModuleDict({name(t): _mlp(in_dim, hidden, rank * t.in_features, "A", t.in_features)
                                        for t in targets})
            self.mlp_b = nn.ModuleDict({name(t): _mlp(in_dim, hidden, t.out_features * rank, "B", t.in_features)
                                        for t in targets})

    def config_dict(self) -> dict:
        """Everything needed to rebuild this decoder (see `from_config_dict`)."""
        return {
            "in_dim": self.in_dim, "rank": self.rank, "alpha": self.alpha, "hidden": self.hidden,
            "heads": self.heads, "embed_dim": self.embed_dim,
            "targets": [[t.layer, t.module, t.in_features, t.out_features, t.path] for t in self.targets],
        }

    @classmethod
    def from_config_dict(cls, d: dict) -> "ParameterDecoder":
        targets = [TargetSpec(*t) for t in d["targets"]]
        return cls(d["in_dim"], targets, d["rank"], d["alpha"], d["hidden"], d["heads"], d["embed_dim"])

    def forward(self, h: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """h: [B, in_dim] (any float dtype) -> {key: (A [B, r, in], B [B, out, r])} in F's dtype."""
        if h.dim() != 2 or h.shape[1] != self.in_dim:
            raise MetatunerError(f"parameter decoder expects h of shape [B, {self.in_dim}], got {tuple(h.shape)}")
        h = self.norm(h.to(self.norm.weight.dtype))
        if self.heads == "shared":
            emb = torch.cat([self.layer_emb(self.layer_ids), self.module_emb(self.module_ids)], dim=-1)
            a = self.side_a(h, emb, self._groups, self.targets)
            b = self.side_b(h, emb, self._groups, self.targets)
            return {t.key: (a[i], b[i]) for i, t in enumerate(self.targets)}
        out = {}
        for t in self.targets:
            name = t.key.replace(".", "_")
            A = self.mlp_a[name](h).reshape(-1, self.rank, t.in_features)
            B = self.mlp_b[name](h).reshape(-1, t.out_features, self.rank)
            out[t.key] = (A, B)
        return out
