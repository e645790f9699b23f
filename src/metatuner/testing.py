"""Tiny random models and a character tokenizer, built in-process, for tests and smoke runs.

Nothing here downloads anything. `tiny_model_dir(path)` writes a complete model directory
(config, safetensors weights, tokenizer with a ChatML template) that `load_model(path)` loads
like any Hugging Face checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with ChatML special tokens (vocab ~104)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_llama(
    vocab_size: int = 104,
    hidden_size: int = 32,
    num_layers: int = 4,
    intermediate_size: int = 64,
    num_heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random Llama with real shapes in miniature (GQA: 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def tiny_model_dir(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny random Llama + char tokenizer to `path` and return it."""
    path = Path(path)
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=seed, **kwargs)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class FakeVllm:
    """Stands in for vllm.LLM in tests: greedy continuations of an hf model returned as vLLM returns them (raw
    token ids up to max_tokens or a stop token, the stop token included; the chosen token's log-probability
    per position), `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` copying (name, tensor)
    pairs into the hf model by name (a wrong name raises KeyError), and `reset_prefix_cache`. Records its
    calls and the names each reload received."""

    def __init__(self, model, tok):
        self.model, self.tok, self.calls, self.loaded, self.resets = model, tok, [], [], 0

    @torch.no_grad()
    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if method != "reload_weights":
            raise AttributeError(f"FakeVllm has no worker method {method!r}")
        state = self.model.state_dict()
        names = []
        for name, tensor in (kwargs or {})["weights_iterator"]:
            state[name].copy_(tensor)
            names.append(name)
        self.loaded.append(names)
        return [None]

    def reset_prefix_cache(self) -> None:
        self.resets += 1

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        self.calls.append((prompts, params))
        outs = []
        for prompt, p in zip(prompts, params):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            seq = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                                      do_sample=False, eos_token_id=p.stop_token_ids, pad_token_id=self.tok.pad_token_id,
                                      output_scores=True, return_dict_in_generate=True)
            new = seq.sequences[0, ids.shape[1]:].tolist()
            lps = [torch.log_softmax(s[0].float(), -1) for s in seq.scores]
            logprobs = [{t: SimpleNamespace(logprob=lp[t].item())} for t, lp in zip(new, lps)]
            outs.append(SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=new, logprobs=logprobs)
                                                 for j in range(getattr(p, "n", 1))]))
        return outs
