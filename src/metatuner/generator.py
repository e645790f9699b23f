"""Generator G split at depth k: meta encoder (phi_s) + prompt decoder (phi_p), and a frozen copy phi_p'.

For a causal LM with K decoder layers:
- meta encoder, phi_s: token embeddings + layers [0, k);
- prompt decoder, phi_p: layers [k, K) + final norm + LM head;
- frozen prompt decoder, phi_p': a copy of phi_p (no gradients) that samples the prompts of the
  task loss; `sync_frozen()` overwrites it with phi_p every T steps.

    gen = SplitGenerator(model, share_ratio=0.25)
    loss, logits, h_k = gen(ids, mask, labels)      # one pass: LM loss (regulariser) and layer-k states
    h_k = gen.param_encode(ids, mask)               # states that feed F (own encoder copy if share_encoder=False)
    prompts = gen.sample_prompts(ids, mask, do_sample=True, max_new_tokens=96)   # layers [0,k) live, [k,K) frozen

Models with tied input/output embeddings (e.g. SmolLM2): the tied matrix is counted in the meta
encoder's parameters (it is the embedding table) and not again in the prompt decoder's; the
frozen copy holds its own untied copy of the LM head.

Generation and `encode` run on "shells": causal-LM objects built on the meta device whose
submodules are the live (or frozen) modules themselves, so nothing is copied and no weights are
allocated twice. Shells are not registered as submodules (no duplicate state-dict entries).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from metatuner.errors import MetatunerError
from metatuner.lora import decoder_layers


def split_depth(num_layers: int, share_ratio: float) -> int:
    """k = round(share_ratio * K) (halves round up); must satisfy 1 <= k <= K-1."""
    k = int(math.floor(share_ratio * num_layers + 0.5))
    if not 1 <= k <= num_layers - 1:
        raise MetatunerError(
            f"generator.share_ratio {share_ratio} gives split depth k={k} for {num_layers} layers; "
            f"need 1 <= k <= {num_layers - 1}"
        )
    return k


# ----------------------------------------------------------------------------- safetensors state


def save_state(modules: dict[str, nn.Module], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Save the state dicts of named modules into one safetensors file (no pickle), atomically.

    Keys are "<name>.<state key>". Tensors that are the same Parameter (tied weights) are stored
    once; the aliases go into the file's metadata and are restored by `load_state`.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, module in modules.items():
        for key, t in module.state_dict(keep_vars=True).items():
            full = f"{name}.{key}"
            if id(t) in seen:
                aliases[full] = seen[id(t)]
                continue
            seen[id(t)] = full
            tensors[full] = t.detach().cpu().contiguous().clone()
    meta = {"aliases": json.dumps(aliases), "user": json.dumps(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_state_metadata(path: str | os.PathLike) -> dict:
    """The `metadata` dict given to `save_state`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("user", "{}"))


def load_state(modules: dict[str, nn.Module], path: str | os.PathLike) -> None:
    """Load a `save_state` file into the named modules, strictly (every key must match)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MetatunerError(f"checkpoint not found: {path}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    flat = load_file(str(path))
    for alias, original in aliases.items():
        flat[alias] = flat[original]
    for name, module in modules.items():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as e:
            raise MetatunerError(f"{path}: part {name!r} does not match this model ({str(e).splitlines()[0]})") from None
    unknown = sorted({k.split(".")[0] for k in flat} - set(modules))
    if unknown:
        raise MetatunerError(f"{path}: holds parts {unknown} that were not asked for")


# ----------------------------------------------------------------------------- the split generator


def _shell(model: nn.Module, base_only: bool) -> nn.Module:
    """An empty (meta-device) copy of `model`'s class: a causal LM, or its base model if base_only."""
    cls = type(model.base_model) if base_only else type(model)
    with torch.device("meta"):
        return cls(model.config)


def _check_no_meta(shell: nn.Module) -> None:
    left = [n for n, t in list(shell.named_parameters()) + list(shell.named_buffers()) if t.is_meta]
    if left:
        raise MetatunerError(f"generator: unsupported architecture, could not share modules {left[:3]}")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as `generate` does), so left padding does not
    shift them and a row's states do not depend on how long the other rows are.  [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class SplitGenerator(nn.Module):
    """A Hugging Face causal LM (Llama/Qwen2/Mistral layout) split into meta encoder and prompt decoder.

    Registered parts (what `state_modules()` saves): `model` (the live G: phi_s and phi_p),
    `frozen` (phi_p': layers [k, K), norm, lm_head, no grad) and, with share_encoder=False,
    `param_encoder` (F's own copy of embeddings + layers [0, k), trainable).
    """

    def __init__(self, model: nn.Module, share_ratio: float = 0.25, share_encoder: bool = True):
        super().__init__()
        self.model = model
        base = model.base_model
        layers = decoder_layers(model)[1]
        if not (hasattr(base, "layers") and base.layers is layers and hasattr(base, "norm")
                and hasattr(base, "embed_tokens")):
            raise MetatunerError(
                f"generator: {type(model).__name__} is not a Llama-style model (model.embed_tokens, model.layers, model.norm)")
        self.num_layers = len(layers)
        self.k = split_depth(self.num_layers, share_ratio)
        self.share_encoder = bool(share_encoder)

        self.frozen = nn.ModuleDict({
            "layers": copy.deepcopy(nn.ModuleList(layers[self.k:])),
            "norm": copy.deepcopy(base.norm),
            "lm_head": copy.deepcopy(model.get_output_embeddings()),
        })
        self.frozen.requires_grad_(False)
        if not self.share_encoder:
            self.param_encoder = nn.ModuleDict({
                "embed_tokens": copy.deepcopy(base.embed_tokens),
                "layers": copy.deepcopy(nn.ModuleList(layers[: self.k])),
            })
        else:
            self.param_encoder = None
        # Shells live in a plain dict: not submodules, so no duplicate parameters or state keys.
        self._shells = {"encoder": self._encoder_shell(base.embed_tokens, layers[: self.k])}
        if not self.share_encoder:
            self._shells["param_encoder"] = self._encoder_shell(
                self.param_encoder["embed_tokens"], self.param_encoder["layers"])
        self._shells["frozen_lm"] = self._frozen_lm_shell()

    # -- shells

    def _encoder_shell(self, embed: nn.Module, layers) -> nn.Module:
        """Base model over `layers` only, without final norm: its last_hidden_state is h_k."""
        shell = _shell(self.model, base_only=True)
        base = self.model.base_model
        for name, child in base.named_children():
            setattr(shell, name, child)
        shell.embed_tokens = embed
        shell.layers = nn.ModuleList(layers)
        shell.norm = nn.Identity()
        _check_no_meta(shell)
        return shell

    def _frozen_lm_shell(self) -> nn.Module:
        """Causal LM with live embeddings + layers [0, k) and frozen layers [k, K) + norm + head."""
        shell = _shell(self.model, base_only=False)
        base = self.model.base_model
        for name, child in base.named_children():
            setattr(shell.base_model, name, child)
        live_layers = decoder_layers(self.model)[1]
        shell.base_model.layers = nn.ModuleList(list(live_layers[: self.k]) + list(self.frozen["layers"]))
        shell.base_model.norm = self.frozen["norm"]
        shell.set_output_embeddings(self.frozen["lm_head"])
        _check_no_meta(shell)
        return shell

    # -- parameter groups

    def encoder_parameters(self) -> list[nn.Parameter]:
        """phi_s: token embeddings and layers [0, k) of the live G."""
        base = self.model.base_model
        layers = decoder_layers(self.model)[1]
        params = list(base.embed_tokens.parameters())
        for layer in layers[: self.k]:
            params += list(layer.parameters())
        return params

    def decoder_parameters(self) -> list[nn.Parameter]:
        """phi_p: layers [k, K), final norm and LM head of the live G (minus a head tied to the embeddings)."""
        base = self.model.base_model
        layers = decoder_layers(self.model)[1]
        enc = {id(p) for p in self.encoder_parameters()}
        params = []
        for module in list(layers[self.k:]) + [base.norm, self.model.get_output_embeddings()]:
            params += [p for p in module.parameters() if id(p) not in enc]
        return params

    def param_encoder_parameters(self) -> list[nn.Parameter]:
        """F's own encoder copy (share_encoder=False); empty when the encoder is shared."""
        return [] if self.param_encoder is None else list(self.param_encoder.parameters())

    def state_modules(self) -> dict[str, nn.Module]:
        """The parts a checkpoint holds, by name (for save_state / load_state)."""
        parts = {"generator": self.model, "frozen": self.frozen}
        if self.param_encoder is not None:
            parts["param_encoder"] = self.param_encoder
        return parts

    # -- forward passes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """One pass of the live G.  -> (loss or None, logits [B, T, V], hidden_k [B, T, d]).

        hidden_k is the state after layer k (hidden_states[k]); only that one is kept. Positions
        count real tokens only (see `position_ids`), here and in `encode`.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         position_ids=position_ids(attention_mask), output_hidden_states=self.k, use_cache=False)
        return out.loss, out.logits, out.hidden_states[self.k]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Meta encoder phi_s only (stops after layer k): [B, T] -> hidden_k [B, T, d]."""
        return self._shells["encoder"](input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state

    def param_encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The states F reads: `encode` when shared, else F's own encoder copy (ablation w/o S)."""
        if self.param_encoder is None:
            return self.encode(input_ids, attention_mask)
        return self._shells["param_encoder"](input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=position_ids(attention_mask),
                                             use_cache=False).last_hidden_state

    @torch.no_grad()
    def sample_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate with layers [0, k) of the live encoder and the frozen prompt decoder phi_p'.

        Returns what `generate` returns (by default [B*n, T + new] token ids).
        """
        shell = self._shells["frozen_lm"]
        shell.generation_config = self.model.generation_config  # follow the live model's settings
        return shell.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    @torch.no_grad()
    def generate_live(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate with the live G (phi_s, phi_p): test-time rewriting."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    @torch.no_grad()
    def sync_frozen(self) -> None:
        """phi_p' <- phi_p, exactly."""
        base = self.model.base_model
        layers = decoder_layers(self.model)[1]
        for dst, src in zip(self.frozen["layers"], layers[self.k:]):
            dst.load_state_dict(src.state_dict())
        self.frozen["norm"].load_state_dict(base.norm.state_dict())
        self.frozen["lm_head"].load_state_dict(self.model.get_output_embeddings().state_dict())

    # -- checkpoints

    def save(self, path: str | os.PathLike, extra: dict[str, nn.Module] | None = None, metadata: dict | None = None) -> None:
        """All trainable parts (generator, frozen copy, separate encoder) plus `extra` modules
        (e.g. {"hypernet": decoder}) into one safetensors file, atomically."""
        meta = {"k": self.k, "num_layers": self.num_layers, "share_encoder": self.share_encoder, **(metadata or {})}
        save_state({**self.state_modules(), **(extra or {})}, path, meta)

    def load(self, path: str | os.PathLike, extra: dict[str, nn.Module] | None = None) -> dict:
        """Load a `save` file into this generator (and `extra`); returns its metadata."""
        if not Path(path).is_file():
            raise MetatunerError(f"checkpoint not found: {path}")
        meta = read_state_metadata(path)
        mine = {"k": self.k, "num_layers": self.num_layers, "share_encoder": self.share_encoder}
        for key, value in mine.items():
            if key in meta and meta[key] != value:
                raise MetatunerError(f"{path}: saved with {key}={meta[key]}, this generator has {key}={value} "
                                     f"(check generator.share_ratio / generator.share_encoder)")
        load_state({**self.state_modules(), **(extra or {})}, path)
        return meta


def save_metatuner(out_dir: str | os.PathLike, generator: SplitGenerator, decoder: nn.Module) -> Path:
    """Write generator.safetensors (G, phi_p', separate encoder, F) and hypernet.json (F's config)."""
    from metatuner.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator.save(out / "generator.safetensors", extra={"hypernet": decoder})
    if hasattr(decoder, "config_dict"):
        write_json(out / "hypernet.json", decoder.config_dict())
    return out


def load_metatuner(out_dir: str | os.PathLike, generator: SplitGenerator, decoder: nn.Module) -> dict:
    """Load `save_metatuner` output into an already built generator and decoder."""
    return generator.load(Path(out_dir) / "generator.safetensors", extra={"hypernet": decoder})
