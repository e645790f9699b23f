"""LoRA for the actor: batched per-query LoRA (MetaTuner), static PEFT LoRA (baselines), PEFT export.

Per-query LoRA gives every row of a batch its own low-rank update of each target Linear:

    y_b = x_b W^T + s * (x_b A_b^T) B_b^T        A_b: [r, in], B_b: [out, r], s = alpha / r

computed with two batched matmuls over the batch (never a Python loop over rows, never a merged
[out, in] weight per row). It is attached with forward hooks, so module names, state dicts and
`save_pretrained` of the actor are untouched and, with no factors set, the model is exactly the
base model.

    targets = find_targets(model, cfg.lora.target_modules, cfg.lora.layers)
    lora = PerQueryLoRA(model, targets, rank=8, alpha=16)
    with lora.use_factors(decoder(h)):          # {"7.q_proj": (A [B,r,in], B [B,out,r]), ...}
        loss = model(input_ids, attention_mask=mask, labels=labels).loss
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from metatuner.errors import MetatunerError
from metatuner.io import atomic_path

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TargetSpec:
    """One Linear that gets LoRA: decoder layer index, module name (last path component), sizes.

    `path` is the module's full name inside the model it was found in (e.g.
    "model.layers.7.self_attn.q_proj"); PEFT export and hook attachment use it.
    """

    layer: int
    module: str
    in_features: int
    out_features: int
    path: str = ""

    @property
    def key(self) -> str:
        """Stable name used in factor dicts and checkpoints, e.g. "7.q_proj"."""
        return f"{self.layer}.{self.module}"


# ----------------------------------------------------------------------------- finding targets


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers and its full name (e.g. "model.layers" for Llama/Qwen2/Mistral).

    Picks the longest ModuleList whose name ends in "layers" (GPT-2 style ".h" as a fallback).
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h") and len(mod) > 0:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise MetatunerError(f"{type(model).__name__}: found no list of decoder layers (expected e.g. model.layers)")
    return best


def _parse_layers(layers: str, n: int) -> list[int]:
    """Python slice 'start:end' (or 'start:end:step', or '') over n layers -> the layer indices."""
    text = (layers or "").strip()
    if not text:
        return list(range(n))
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise MetatunerError(f"lora.layers must be a slice 'start:end' or empty, got {layers!r}")
    try:
        bounds = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise MetatunerError(f"lora.layers must be a slice 'start:end' of integers, got {layers!r}") from None
    if len(bounds) == 3 and bounds[2] == 0:
        raise MetatunerError(f"lora.layers slice step must not be 0, got {layers!r}")
    picked = list(range(n))[slice(*bounds)]
    if not picked:
        raise MetatunerError(f"lora.layers {layers!r} selects no layer of the {n} decoder layers")
    return picked


def find_targets(model: nn.Module, target_modules: list[str], layers: str = "") -> list[TargetSpec]:
    """All nn.Linear modules inside the selected decoder layers whose last name component is in
    `target_modules`, ordered by layer then by module order in the layer.

    Raises MetatunerError naming `lora.target_modules` / `lora.layers` (with the available names).
    """
    list_name, layer_list = decoder_layers(model)
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not target_modules:
        raise MetatunerError("lora.target_modules must name at least one module")
    available = sorted({
        name.split(".")[-1]
        for block in layer_list
        for name, mod in block.named_modules()
        if isinstance(mod, nn.Linear)
    })
    unknown = [m for m in target_modules if m not in available]
    if unknown:
        raise MetatunerError(
            f"lora.target_modules: {', '.join(map(repr, unknown))} not found in the decoder layers; "
            f"available: {', '.join(available)}"
        )
    wanted = set(target_modules)
    targets = []
    for i in _parse_layers(layers, len(layer_list)):
        for name, mod in layer_list[i].named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in wanted:
                targets.append(TargetSpec(i, name.split(".")[-1], mod.in_features, mod.out_features,
                                          path=f"{list_name}.{i}.{name}"))
    if not targets:
        raise MetatunerError(f"lora.target_modules {target_modules} with lora.layers {layers!r} selects no Linear")
    keys = [t.key for t in targets]
    if len(set(keys)) != len(keys):
        raise MetatunerError("lora.target_modules: a module name occurs twice in one layer; name them uniquely")
    return targets


# ----------------------------------------------------------------------------- per-query LoRA


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """s * (x A^T) B^T per row.  x: [N, T, in], A: [N, r, in], B: [N, out, r] -> [N, T, out].

    The rank-r product comes first, so no [out, in] matrix is ever formed; the scale is applied
    on the small [N, T, r] intermediate.
    """
    low = torch.bmm(x, A.transpose(1, 2)) * scale  # [N, T, r]
    return torch.bmm(low, B.transpose(1, 2))  # [N, T, out]


class PerQueryLoRA:
    """Batched per-query LoRA on the target Linears of `model`, attached as forward hooks.

    `set_factors({key: (A [B, r, in], B [B, out, r])})` gives row b of the next batches the update
    s * B[b] @ A[b] (s = alpha / rank). When the model sees k*B rows (generate with
    num_return_sequences=k, or beams), the factors are repeated k times per row
    (repeat_interleave), matching how `generate` expands its inputs. Factors may be non-leaf
    tensors (gradients flow back to whatever produced them); they are cast to the activations'
    dtype, so bf16 autocast and bf16 models work. Base weights are not touched.
    """

    def __init__(self, model: nn.Module, targets: list[TargetSpec], rank: int, alpha: float):
        if rank <= 0:
            raise MetatunerError(f"lora.rank must be > 0, got {rank}")
        if not targets:
            raise MetatunerError("lora.target_modules selects no module")
        self.model = model
        self.targets = list(targets)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = self.alpha / self.rank
        self._factors: Factors | None = None
        self._unnarrowed: Factors | None = None  # the factors before keep_rows narrowed them
        modules = dict(model.named_modules())
        self._hooks = []
        for t in self.targets:
            mod = modules.get(t.path)
            if not isinstance(mod, nn.Linear):
                raise MetatunerError(f"lora.target_modules: {t.path!r} is not a Linear of this model")
            self._hooks.append(mod.register_forward_hook(self._make_hook(t.key)))

    def _make_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor):
            if self._factors is None:
                return None
            A, B = self._factors[key]
            x = args[0]
            shape = x.shape
            x3 = x.reshape(shape[0], -1, shape[-1])  # [N, T, in] (T=1 for 2-D input)
            n = x3.shape[0]
            if n != A.shape[0]:
                if n % A.shape[0]:
                    raise MetatunerError(
                        f"per-query LoRA: input batch {n} is not a multiple of the factor batch {A.shape[0]}")
                A = A.repeat_interleave(n // A.shape[0], dim=0)
                B = B.repeat_interleave(n // B.shape[0], dim=0)
            delta = lora_delta(x3, A.to(x.dtype), B.to(x.dtype), self.scale)
            return output + delta.reshape(*shape[:-1], delta.shape[-1]).to(output.dtype)

        return hook

    def set_factors(self, factors: Factors) -> None:
        """Use these factors from now on: {target key: (A [B, r, in], B [B, out, r])}, one B for all."""
        keys = {t.key for t in self.targets}
        if set(factors) != keys:
            missing, extra = sorted(keys - set(factors)), sorted(set(factors) - keys)
            raise MetatunerError(f"per-query LoRA factors: missing keys {missing}, unknown keys {extra}")
        batch = None
        for t in self.targets:
            A, B = factors[t.key]
            if A.dim() != 3 or B.dim() != 3:
                raise MetatunerError(f"per-query LoRA factors for {t.key}: expected 3-D A and B, got "
                                     f"{tuple(A.shape)} and {tuple(B.shape)}")
            batch = A.shape[0] if batch is None else batch
            if tuple(A.shape) != (batch, self.rank, t.in_features) or tuple(B.shape) != (batch, t.out_features, self.rank):
                raise MetatunerError(
                    f"per-query LoRA factors for {t.key}: expected A {(batch, self.rank, t.in_features)} and "
                    f"B {(batch, t.out_features, self.rank)}, got {tuple(A.shape)} and {tuple(B.shape)}")
        self._factors = dict(factors)

    def clear_factors(self) -> None:
        """Back to the base model exactly."""
        self._factors = None

    def keep_rows(self, rows: torch.Tensor | None) -> None:
        """Keep only these rows of the current factors (a decoding loop whose finished rows leave the batch:
        the rows still decoding keep their own factors); `None` puts back the factors as they were before
        the first narrowing (the loop calls it when it ends, however it ends)."""
        if rows is None:
            if self._unnarrowed is not None:
                self._factors, self._unnarrowed = self._unnarrowed, None
            return
        if self._factors is None:
            return
        if self._unnarrowed is None:
            self._unnarrowed = self._factors
        rows = rows.to(next(iter(self._factors.values()))[0].device)
        self._factors = {k: (A.index_select(0, rows), B.index_select(0, rows)) for k, (A, B) in self._factors.items()}

    @contextlib.contextmanager
    def use_factors(self, factors: Factors):
        """`with lora.use_factors(f): ...` sets factors for the block and restores the previous ones."""
        previous = self._factors
        self.set_factors(factors)
        try:
            yield self
        finally:
            self._factors = previous

    def remove(self) -> None:
        """Detach the hooks (the model is the plain base model again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._factors = None


def attach_per_query_lora(model: nn.Module, targets: list[TargetSpec], rank: int, alpha: float) -> PerQueryLoRA:
    """Same as `PerQueryLoRA(model, targets, rank, alpha)`."""
    return PerQueryLoRA(model, targets, rank, alpha)


# ----------------------------------------------------------------------------- static LoRA (PEFT)


def peft_lora_config(model: nn.Module, cfg, base_model_name_or_path: str | None = None):
    """A peft LoraConfig for `cfg` (a LoRAConfig) over the same modules `find_targets` selects."""
    from peft import LoraConfig

    if cfg.rank <= 0:
        raise MetatunerError(f"lora.rank must be > 0, got {cfg.rank}")
    targets = find_targets(model, list(cfg.target_modules), cfg.layers)
    list_name, layer_list = decoder_layers(model)
    layer_ids = sorted({t.layer for t in targets})
    all_layers = len(layer_ids) == len(layer_list)
    return LoraConfig(
        r=int(cfg.rank),
        lora_alpha=float(cfg.alpha),
        lora_dropout=float(cfg.dropout),
        target_modules=sorted({t.module for t in targets}),
        layers_to_transform=None if all_layers else layer_ids,
        layers_pattern=None if all_layers else list_name.split(".")[-1],
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def static_lora(model: nn.Module, cfg):
    """Wrap `model` in a PEFT LoRA (one adapter for all queries) with the targets of `cfg` (LoRAConfig).

    Modifies `model` in place (PEFT injects its layers) and returns the PeftModel.
    """
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(model, cfg))


# ----------------------------------------------------------------------------- PEFT export


def _one_query(t: TargetSpec, A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if A.dim() == 3:
        if A.shape[0] != 1 or B.shape[0] != 1:
            raise MetatunerError(f"export_peft_adapter: factors for {t.key} hold {A.shape[0]} queries; pass one")
        A, B = A[0], B[0]
    if tuple(A.shape) != (rank, t.in_features) or tuple(B.shape) != (t.out_features, rank):
        raise MetatunerError(f"export_peft_adapter: factors for {t.key} have shapes {tuple(A.shape)}, "
                             f"{tuple(B.shape)}; expected {(rank, t.in_features)}, {(t.out_features, rank)}")
    return A, B


def export_peft_adapter(
    targets: list[TargetSpec],
    factors_for_one_query: Factors,
    rank: int,
    alpha: float,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write one query's generated LoRA as a standard PEFT adapter directory.

    `factors_for_one_query`: {key: (A [r, in] or [1, r, in], B [out, r] or [1, out, r])}. The
    targets must come from `find_targets` on the plain Hugging Face model, so their `path` is the
    module name PEFT sees. `PeftModel.from_pretrained(base, out_dir)` then reproduces the actor's
    logits for that query. Written to a temporary folder, then renamed into place.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if rank <= 0:
        raise MetatunerError(f"lora.rank must be > 0, got {rank}")
    tensors = {}
    for t in targets:
        if t.key not in factors_for_one_query:
            raise MetatunerError(f"export_peft_adapter: no factors for target {t.key}")
        A, B = _one_query(t, *factors_for_one_query[t.key], rank)
        path = t.path.removeprefix("base_model.model.")
        tensors[f"base_model.model.{path}.lora_A.weight"] = A.detach().float().cpu().contiguous().clone()
        tensors[f"base_model.model.{path}.lora_B.weight"] = B.detach().float().cpu().contiguous().clone()
    config = LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        # Full module paths: matches exactly these modules (PEFT accepts exact names).
        target_modules=sorted(t.path.removeprefix("base_model.model.") for t in targets),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )

    out = Path(out_dir)
    with atomic_path(out, directory=True) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
