"""Generator G split at depth k: meta encoder (phi_s) + prompt decoder (phi_p), and phi_p'.

For a causal LM with K decoder layers:
- meta encoder, phi_s: token embeddings + layers [0, k);
- prompt decoder, phi_p: layers [k, K) + final norm + LM head;
- phi_p': a frozen copy of what TRAINS in phi_p (G's LoRA factors of layers [k, K) when G is trained
  as LoRA; the whole upper stack when generator.lora_rank=0), kept as buffers, never the frozen base
  weights. It samples the prompts of the task loss: `sample_prompts` swaps these tensors into the
  live model for the call (no copy: the storage is exchanged) and back. `sync_frozen()` copies
  phi_p into it every T steps.

    gen = SplitGenerator(model, share_ratio=0.25)
    loss, logits, h_k = gen(ids, mask, labels)      # one pass: LM loss (regulariser) and layer-k states
    h_k = gen.param_encode(ids, mask)               # states that feed F (own encoder copy if share_encoder=False)
    prompts = gen.sample_prompts(ids, mask, do_sample=True, max_new_tokens=96)   # phi_s live, phi_p' frozen

Checkpoints (`save`/`load`) hold only trained tensors: G's trainable parameters (LoRA factors, or all
of G with lora_rank=0), phi_p', F's own encoder copy (w/o S; its trainable part) and `extra` modules
(F). The base weights come from the base checkpoint at load time.

Models with tied input/output embeddings (e.g. SmolLM2): the tied matrix counts as the embedding
table (meta encoder), not as part of the prompt decoder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from metatuner.errors import MetatunerError
from metatuner.io import atomic_path
from metatuner.lora import decoder_layers
from metatuner.sharding import copy_full_into, is_dtensor, whole
from metatuner.state_file import read_state_metadata


def split_depth(num_layers: int, share_ratio: float) -> int:
    """k = round(share_ratio * K) (halves round up); must satisfy 1 <= k <= K-1."""
    k = int(math.floor(share_ratio * num_layers + 0.5))
    if not 1 <= k <= num_layers - 1:
        raise MetatunerError(
            f"generator.share_ratio {share_ratio} gives split depth k={k} for {num_layers} layers; "
            f"need 1 <= k <= {num_layers - 1}"
        )
    return k


# ----------------------------------------------------------------------------- the split generator


def _shell(model: nn.Module) -> nn.Module:
    """An empty (meta-device) base model of `model`'s class."""
    with torch.device("meta"):
        return type(model.base_model)(model.config)


def _check_no_meta(shell: nn.Module) -> None:
    left = [n for n, t in list(shell.named_parameters()) + list(shell.named_buffers()) if t.is_meta]
    if left:
        raise MetatunerError(f"generator: unsupported architecture, could not share modules {left[:3]}")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only (as `generate` does), so left padding does not
    shift them and a row's states do not depend on how long the other rows are.  [B, T] -> [B, T]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")


class SplitGenerator(nn.Module):
    """A Hugging Face causal LM (Llama/Qwen2/Mistral layout) split into meta encoder and prompt decoder.

    Registered parts: `model` (the live G: phi_s and phi_p), `frozen` (phi_p': buffers, one per
    trainable tensor of phi_p) and, with share_encoder=False, `param_encoder` (F's own copy of
    embeddings + layers [0, k); its trainable tensors train with F).
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
        dec = {id(p) for p in self.decoder_parameters()}
        self._decoder_names = [n for n, p in model.named_parameters() if id(p) in dec and p.requires_grad]
        self.frozen = nn.Module()
        params = dict(model.named_parameters())
        for n in self._decoder_names:
            self.frozen.register_buffer(_buffer_name(n), params[n].detach().clone())
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

    def _encoder_shell(self, embed: nn.Module, layers) -> nn.Module:
        """Base model over `layers` only, without final norm: its last_hidden_state is h_k."""
        shell = _shell(self.model)
        for name, child in self.model.base_model.named_children():
            setattr(shell, name, child)
        shell.embed_tokens = embed
        shell.layers = nn.ModuleList(layers)
        shell.norm = nn.Identity()
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

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """phi_p' by parameter name of the live model."""
        return {n: getattr(self.frozen, _buffer_name(n)) for n in self._decoder_names}

    def live_decoder_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors of phi_p, by the same names as `frozen_state`."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self._decoder_names}

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint holds of G: trainable tensors of G, phi_p', trainable tensors of
        F's own encoder copy. Never a frozen base weight."""
        out = {f"generator.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}
        out.update({f"frozen.{n}": t for n, t in self.frozen.named_buffers()})
        if self.param_encoder is not None:
            out.update({f"param_encoder.{n}": p for n, p in self.param_encoder.named_parameters() if p.requires_grad})
        return out

    # -- forward passes

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None):
        """One pass of the live G.  -> (loss or None, logits [B, T, V], hidden_k [B, T, d]).

        hidden_k is the state after layer k (hidden_states[k]). Positions count real tokens only
        (see `position_ids`), here and in `encode`.
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         position_ids=position_ids(attention_mask), output_hidden_states=True, use_cache=False)
        return out.loss, out.logits, out.hidden_states[self.k]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Meta encoder phi_s only (stops after layer k): [B, T] -> hidden_k [B, T, d]. With G sharded
        (FSDP2) the embeddings live in G's root unit, which only G's own forward gathers: gathered here for
        the call (no gradient then; every process calls it alike)."""
        sharded = hasattr(self.model, "unshard")
        if sharded and torch.is_grad_enabled():
            raise MetatunerError("generator: the meta encoder alone runs without gradients when G is sharded")
        if sharded:
            self.model.unshard()
        try:
            return self._shells["encoder"](input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        finally:
            if sharded:
                self.model.reshard()

    def param_encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The states F reads: `encode` when shared, else F's own encoder copy (ablation w/o S)."""
        if self.param_encoder is None:
            return self.encode(input_ids, attention_mask)
        return self._shells["param_encoder"](input_ids=input_ids, attention_mask=attention_mask,
                                             position_ids=position_ids(attention_mask),
                                             use_cache=False).last_hidden_state

    @contextlib.contextmanager
    def frozen_decoder(self):
        """Inside the block the live model computes with phi_p' in place of phi_p (storage swapped, no copy)."""
        live, frozen = self.live_decoder_state(), self.frozen_state()
        if any(is_dtensor(t) for t in live.values()):  # sharded (FSDP2 owns the storage): swap values
            yield from self._frozen_by_copy(live, frozen)
            return
        swapped = []
        try:
            with torch.no_grad():
                for n in self._decoder_names:
                    live[n].data, frozen[n].data = frozen[n].data, live[n].data
                    swapped.append(n)
            yield
        finally:
            with torch.no_grad():
                for n in swapped:
                    live[n].data, frozen[n].data = frozen[n].data, live[n].data

    def _frozen_by_copy(self, live: dict, frozen: dict):
        keep = {n: t.detach().clone() for n, t in live.items()}
        try:
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(frozen[n])
            yield
        finally:
            with torch.no_grad():
                for n, t in live.items():
                    t.copy_(keep[n])

    @torch.no_grad()
    def sample_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate with the live meta encoder and the frozen prompt decoder phi_p' ([B*n, T + new] ids)."""
        with self.frozen_decoder():
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    @torch.no_grad()
    def generate_live(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """Generate with the live G (phi_s, phi_p): test-time rewriting."""
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    @torch.no_grad()
    def sync_frozen(self) -> None:
        """phi_p' <- phi_p, exactly (copies only the trained tensors)."""
        frozen = self.frozen_state()
        for n, p in self.live_decoder_state().items():
            frozen[n].copy_(p.detach())

    # -- checkpoints

    def save(self, path: str | os.PathLike, extra: dict[str, nn.Module] | None = None, metadata: dict | None = None,
             write: bool = True) -> None:
        """The trained state (see `trained_state`) plus `extra` modules (e.g. {"hypernet": F}) into
        one safetensors file, atomically. With G sharded every process calls it (the tensors are gathered)
        and only the one with write=True writes."""
        from safetensors.torch import save_file

        meta = {"k": self.k, "num_layers": self.num_layers, "share_encoder": self.share_encoder, **(metadata or {})}
        if not write:  # another process's share of a sharded save: take part in each gather, keep nothing
            for v in self.trained_state().values():
                if is_dtensor(v):
                    whole(v)
            return
        tensors = {k: whole(v).cpu().contiguous().clone() for k, v in self.trained_state().items()}
        for name, module in (extra or {}).items():
            tensors.update({f"{name}.{k}": whole(v).cpu().contiguous().clone() for k, v in module.state_dict().items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"user": json.dumps(meta), "aliases": "{}"})

    def load(self, path: str | os.PathLike, extra: dict[str, nn.Module] | None = None) -> dict:
        """Load a `save` file into this generator (and `extra`), strictly; returns its metadata."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise MetatunerError(f"checkpoint not found: {path}")
        meta = read_state_metadata(path)
        mine = {"k": self.k, "num_layers": self.num_layers, "share_encoder": self.share_encoder}
        for key, value in mine.items():
            if key in meta and meta[key] != value:
                raise MetatunerError(f"{path}: saved with {key}={meta[key]}, this generator has {key}={value} "
                                     f"(check generator.share_ratio / generator.share_encoder)")
        try:
            flat = load_file(str(path))
        except Exception as e:
            raise MetatunerError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None
        want = self.trained_state()
        extra = extra or {}
        mine_keys = {k for k in flat if k.split(".")[0] not in extra}
        if mine_keys != set(want):
            miss, unexp = sorted(set(want) - mine_keys), sorted(mine_keys - set(want))
            raise MetatunerError(f"{path}: does not match this generator (missing {miss[:3]}, unexpected {unexp[:3]}; "
                                 "check generator.lora_rank / lora_targets / share_ratio)")
        with torch.no_grad():
            for k, t in want.items():
                if t.shape != flat[k].shape:
                    raise MetatunerError(f"{path}: {k} has shape {tuple(flat[k].shape)}, expected {tuple(t.shape)}")
                copy_full_into(t, flat[k])
        for name, module in extra.items():
            sub = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}
            try:
                module.load_state_dict(sub, strict=True)
            except RuntimeError as e:
                raise MetatunerError(f"{path}: part {name!r} does not match this model ({str(e).splitlines()[0]})") from None
        return meta


def save_metatuner(out_dir: str | os.PathLike, generator: SplitGenerator, decoder: nn.Module, write: bool = True) -> Path:
    """Write generator.safetensors (G's trained tensors, phi_p', F) and hypernet.json (F's config).
    With G sharded every process calls it; the one with write=True writes."""
    from metatuner.io import write_json

    out = Path(out_dir)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    generator.save(out / "generator.safetensors", extra={"hypernet": decoder}, write=write)
    if not write:
        return out
    if hasattr(decoder, "config_dict"):
        write_json(out / "hypernet.json", decoder.config_dict())
    return out


def load_metatuner(out_dir: str | os.PathLike, generator: SplitGenerator, decoder: nn.Module) -> dict:
    """Load `save_metatuner` output into an already built generator and decoder."""
    return generator.load(Path(out_dir) / "generator.safetensors", extra={"hypernet": decoder})


@contextlib.contextmanager
def generator_lora_disabled(gen_model):
    """G as it was before training: every injected LoRA layer bypassed (its base weights only)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in gen_model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b
