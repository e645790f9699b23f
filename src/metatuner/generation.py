"""Batched generation for every method: chat rendering, greedy decoding with a shared prefix and rows
that leave the batch when done (`greedy_texts`; with the NLL of a reference from the same prompt pass:
`greedy_with_nll`), sampling through Hugging Face `generate` with each
prompt run once for its n samples (`generate_texts`, `PromptCache`), and one stopping rule for both: an
end token, max_new_tokens, or the task's answer line (`answer_end`)."""

from __future__ import annotations

import copy
import math
import re
import warnings

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def chat_text(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages with the tokenizer's template (plain text fallback without one)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "\n\n".join(m["content"] for m in messages)
    return text + ("\nAnswer:" if add_generation_prompt else "")


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's end token and every end token of the model's generation config (chat models often
    list several, e.g. <|im_end|> and <|endoftext|>); passing only one to generate would drop the others."""
    gc_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stop = [tokenizer.eos_token_id] + (list(gc_eos) if isinstance(gc_eos, (list, tuple)) else [gc_eos])
    return list(dict.fromkeys(t for t in stop if t is not None))


def _forward(model, cache, keep: int = 1, **kw):
    """One forward pass that extends `cache`, returning only the last `keep` positions' logits where the model
    allows (0: all)."""
    before = cache.get_seq_length()
    try:
        out = model(**kw, cache=cache, use_cache=True, logits_to_keep=keep)
    except TypeError:  # an older forward signature (past_key_values, no logits_to_keep)
        out = None
    if out is None or cache.get_seq_length() == before:  # the model ignored `cache` (took it as **kwargs)
        out = model(**kw, past_key_values=cache, use_cache=True)
    return out


def _left_padded(token_ids: list[list[int]], pad: int, shared: int, dev):
    """(input_ids, attention_mask, position_ids) of the rows' tokens after their first `shared` ones, left
    padded to one width; the mask and positions also cover the shared tokens (positions count real tokens)."""
    b = len(token_ids)
    width = max(len(x) for x in token_ids) - shared
    inp = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    for i, x in enumerate(token_ids):
        suffix = x[shared:]
        inp[i, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
        mask[i, shared + width - len(suffix):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return inp.to(dev), mask.to(dev), pos.to(dev)


def _greedy_steps(model, tokenizer, out, cache, mask, last, max_new_tokens: int, answer_end: str,
                  drop_finished: bool, keep_rows) -> tuple[list[list[str]], list[list[int]]]:
    """The greedy loop after the prompts' pass: `out`'s last logits give every row's first token; `cache`,
    `mask` and `last` (each row's last position) are the prompts'. See greedy_texts."""
    stop = set(stop_token_ids(model, tokenizer))
    end_re = re.compile(answer_end) if answer_end else None
    dev = model.device
    b = mask.shape[0]
    rows = list(range(b))  # the batch row of each sequence still in the batch
    new: list[list[int]] = [[] for _ in range(b)]
    fin = [False] * b
    try:
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1, :].argmax(-1).tolist()
            keep = []
            for j, r in enumerate(rows):
                if not fin[r]:
                    new[r].append(nxt[j])
                    fin[r] = (nxt[j] in stop or len(new[r]) >= max_new_tokens or bool(
                        end_re and end_re.search(tokenizer.decode(new[r], skip_special_tokens=True))))
                if not (fin[r] and drop_finished):
                    keep.append(j)
            if all(fin):
                break
            step = torch.tensor(nxt, device=dev)
            if len(keep) < len(rows):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                if keep_rows is not None:
                    keep_rows(sel)
                step, mask, last = step[sel], mask[sel], last[sel]
                rows = [rows[j] for j in keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            last = last + 1
            out = _forward(model, input_ids=step[:, None], attention_mask=mask, position_ids=last, cache=cache)
    finally:
        if keep_rows is not None:
            keep_rows(None)  # the caller's per-row weights whole again
    gens = [[tokenizer.decode(x, skip_special_tokens=True)] for x in new]  # end tokens are special: not decoded
    return gens, [[len(x)] for x in new]


def _pad_id(model, tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        next(iter(stop_token_ids(model, tokenizer)), 0)


@torch.no_grad()
def greedy_texts(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    answer_end: str = "",
    share_prefix: bool = True,
    drop_finished: bool = True,
    keep_rows=None,
) -> tuple[list[list[str]], list[list[int]]]:
    """Greedy decoding of one batch, with the same outputs as `generate_texts` (up to float rounding) but
    less work: the token prefix all rows share (chat header, task prompt) is run once and its cache copied;
    a row stops at an end token, at max_new_tokens, or as soon as its decoded text matches the regex
    `answer_end`; finished rows leave the batch (drop_finished), so later steps cost only the live rows.
    Keep share_prefix off when the model's weights differ per row (per-query LoRA), and drop_finished too
    unless `keep_rows(indices)` narrows those per-row weights to the rows that stay (PerQueryLoRA.keep_rows;
    called with None at the end to put them back).
    Returns (generations[b][1], n_tokens[b][1]); an end token counts as generated, as in generate_texts."""
    from transformers import DynamicCache

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    b, dev = len(ids), model.device
    shared = 0
    if share_prefix and b > 1:
        shortest = min(len(x) for x in ids)
        while shared < shortest - 1 and all(x[shared] == ids[0][shared] for x in ids):
            shared += 1
    cache = DynamicCache()
    if shared:
        _forward(model, input_ids=torch.tensor([ids[0][:shared]], device=dev), cache=cache)
        cache.batch_repeat_interleave(b)
    inp, mask, pos = _left_padded(ids, _pad_id(model, tokenizer), shared, dev)
    out = _forward(model, input_ids=inp, attention_mask=mask, position_ids=pos[:, shared:], cache=cache)
    return _greedy_steps(model, tokenizer, out, cache, mask, pos[:, -1:], max_new_tokens, answer_end,
                         drop_finished, keep_rows)


def _completion_nll(model, cache, first: torch.Tensor, mask, last, cids: list[list[int]], pad: int):
    """Mean NLL [b] (on the CPU, as training.sequence_nll computes it) of each row's completion tokens `cids`
    teacher-forced on top of `cache` (the prefixes, left padded: `mask`, each row's last position `last`),
    whose last logits `first` predict the completions' first tokens. Extends the cache by the longest
    completion minus one. -> (nll, tokens added to the cache)."""
    import torch.nn.functional as F

    dev = first.device
    C = max((len(c) for c in cids), default=0)
    if C == 0:
        return torch.zeros(len(cids)), 0
    cin = torch.full((len(cids), C), pad, dtype=torch.long)
    cmask = torch.zeros((len(cids), C), dtype=torch.long)
    for i, c in enumerate(cids):
        cin[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[i, : len(c)] = 1
    cin, cmask = cin.to(dev), cmask.to(dev)
    logits = first[:, None, :]
    if C > 1:  # positions 0..C-2 of the completion predict its tokens 1..C-1
        cpos = last + 1 + torch.arange(C - 1, device=dev)[None, :]
        rest = _forward(model, cache, keep=0, input_ids=cin[:, :-1], position_ids=cpos,
                        attention_mask=torch.cat([mask, cmask[:, :-1]], dim=1)).logits
        logits = torch.cat([logits, rest[:, -(C - 1):]], dim=1)
    labels = cin.masked_fill(cmask == 0, -100)
    tok = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="none").view(labels.shape)
    return (tok.sum(1) / cmask.sum(1).clamp(min=1)).cpu(), C - 1


@torch.no_grad()
def greedy_with_nll(model, tokenizer, prefixes: list[str], completions: list[str], max_new_tokens: int,
                    answer_end: str = "", drop_finished: bool = True, keep_rows=None):
    """Each row's greedy answer to `prefixes[i]` and the mean NLL of `completions[i]` (teacher-forced) after
    it, from ONE pass over the prefixes: their cache and last logits serve the completion's scoring (the
    completion tokens run on top of the cache, which is then cut back to the prefixes) and the greedy loop
    (greedy_texts without a shared prefix: right under per-row weights; drop_finished and keep_rows as
    there). A D2 rollout needs both for every (query, candidate); running the prompts once instead of twice
    is most of its cost. -> (generations[b][1], n_tokens[b][1], nll [b] on the CPU, as training.sequence_nll
    computes it)."""
    from transformers import DynamicCache

    dev = model.device
    pad = _pad_id(model, tokenizer)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prefixes]
    cids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    cache = DynamicCache()
    inp, mask, pos = _left_padded(ids, pad, 0, dev)
    out = _forward(model, input_ids=inp, attention_mask=mask, position_ids=pos, cache=cache)
    nll, added = _completion_nll(model, cache, out.logits[:, -1, :], mask, pos[:, -1:], cids, pad)
    if added:
        try:  # back to the prompts alone (a negative crop removes tokens, in old and new transformers)
            cache.crop(-added)
            if cache.get_seq_length() != inp.shape[1]:
                raise ValueError("crop")
        except (ValueError, RuntimeError):  # a cache that cannot crop (e.g. past a sliding window): run again
            cache = DynamicCache()
            out = _forward(model, input_ids=inp, attention_mask=mask, position_ids=pos, cache=cache)
    gens, ntoks = _greedy_steps(model, tokenizer, out, cache, mask, pos[:, -1:], max_new_tokens, answer_end,
                                drop_finished, keep_rows)
    return gens, ntoks, nll


def length_groups(lengths: list[int], slack: float = 1.5, extra: int = 4) -> list[list[int]]:
    """Indices of `lengths` in groups of similar length (shortest first): a group takes the next length while
    it is at most slack x its shortest + extra, so padding every row of a group to its longest wastes little
    (a pool whose one demonstration candidate is 5x the others' length no longer pads them all to it)."""
    groups: list[list[int]] = []
    for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        if groups and lengths[k] <= slack * lengths[groups[-1][0]] + extra:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


@torch.no_grad()
def prefix_nll(model, tokenizer, prefixes: list[str], completions: list[list[str]], max_length: int = 512,
               group: bool = True) -> torch.Tensor:
    """[len(prefixes), C] mean NLL of each prefix's C completions, with every prefix run ONCE and its cache
    copied to its C completions (the same weights for every row). What scoring a candidate pool per query
    needs: the (p~, x) prefix is shared by the query's candidates. As training.lm_batch, a completion keeps
    at most max_length - 1 tokens and a prefix loses tokens from the left until it fits with its longest
    completion (one cut per prefix, so its shorter completions see the same prefix). group=True: the
    (prefix, completion) rows run in groups of similar completion length (`length_groups`), each on its own
    copy of the rows' prefix cache, instead of all padded to the longest completion (the same NLLs up to
    float rounding; benchmarks/pool_scoring.py times both)."""
    from transformers import DynamicCache

    dev = model.device
    pad = _pad_id(model, tokenizer)
    C = len(completions[0]) if completions else 0
    if C == 0:
        return torch.zeros(len(prefixes), 0)
    cids = [tokenizer(c, add_special_tokens=False)["input_ids"][: max_length - 1] for row in completions for c in row]
    ids = []
    for i, t in enumerate(prefixes):
        x = tokenizer(t, add_special_tokens=False)["input_ids"]
        longest = max((len(c) for c in cids[i * C : (i + 1) * C]), default=0)
        ids.append(x[max(0, len(x) + longest - max_length):])
    cache = DynamicCache()
    inp, mask, pos = _left_padded(ids, pad, 0, dev)
    out = _forward(model, input_ids=inp, attention_mask=mask, position_ids=pos, cache=cache)
    first, last = out.logits[:, -1, :], pos[:, -1:]
    groups = length_groups([len(c) for c in cids]) if group and C > 1 else [list(range(len(cids)))]
    nll = torch.zeros(len(cids))
    for g, rows in enumerate(groups):
        sel = torch.tensor([k // C for k in rows], dtype=torch.long, device=dev)
        # the last group may take the prefix cache itself (reorder_cache replaces its tensors by index_select)
        part = cache if g == len(groups) - 1 else copy.deepcopy(cache)
        part.reorder_cache(sel)
        nll[rows], _ = _completion_nll(model, part, first[sel], mask[sel], last[sel], [cids[k] for k in rows], pad)
    return nll.view(len(prefixes), C)


class PromptCache:
    """Every prompt of a batch but its last token, run through the model once (left padding; positions
    count real tokens only, as generate's do). `take(rows, n)` hands out the inputs and a copy of the
    cache for those rows, each repeated n times in place (as generate's num_return_sequences orders
    them), so generate feeds only the last prompt token. Build it under the weights the samples use
    (a per-query LoRA's batch_context over the same rows)."""

    def __init__(self, model, tokenizer, texts: list[str]):
        from transformers import DynamicCache

        tokenizer.padding_side = "left"
        self.enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
        self.cache = DynamicCache()
        if ids.shape[1] > 1:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
            with torch.no_grad():
                _forward(model, input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                         cache=self.cache)

    def take(self, rows: list[int] | None, n: int, keep: bool = True):
        """Inputs and cache for `rows` (None: all) x n. keep=False hands out the cache itself (a one-off use:
        no copy; the PromptCache is spent)."""
        ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
        cache = copy.deepcopy(self.cache) if keep else self.cache
        if rows is not None and list(rows) != list(range(ids.shape[0])):
            sel = torch.tensor(rows, device=ids.device)
            ids, mask = ids[sel], mask[sel]
            if cache.get_seq_length():
                cache.batch_select_indices(sel)
        if n > 1 and cache.get_seq_length():
            cache.batch_repeat_interleave(n)
        enc = {"input_ids": ids.repeat_interleave(n, dim=0), "attention_mask": mask.repeat_interleave(n, dim=0)}
        return enc, (cache if cache.get_seq_length() else None)


class AnswerEnd(StoppingCriteria):
    """Per-row stop once the generated text (after `start` input tokens) matches the regex `pattern`."""

    def __init__(self, tokenizer, pattern: str, start: int):
        self.tokenizer, self.pattern, self.start = tokenizer, re.compile(pattern), start

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([bool(self.pattern.search(t)) for t in texts], device=input_ids.device)


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    return_logprobs: bool = False,
    answer_end: str = "",
    share_prompt: bool = True,
    prompt_cache: tuple[PromptCache, list[int] | None] | None = None,
):
    """Generate for one batch of already-rendered texts. Returns (generations[b][n], n_tokens[b][n], mean_logprob[b][n]).
    A row stops at an end token, at max_new_tokens, or once its text matches the regex `answer_end` (as
    in greedy_texts, so sampled and greedy answers are cut by the same rule).
    With n = num_return_sequences > 1 and `share_prompt`, each prompt is run once and its cache copied to
    its n samples (Hugging Face's num_return_sequences runs every prompt n times); the rows, their order,
    the sampling and so the outputs for a seed are the same (up to float rounding). A per-query LoRA
    (metatuner.lora) stays right: its factors repeat over the n copies as they do under generate.
    `prompt_cache=(PromptCache, rows)`: those rows of a cache built earlier for these texts (rounds of
    sampling from the same prompts, as early stopping draws them) instead of running the prompts again."""
    stop = stop_token_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
    one_off = prompt_cache is None and share_prompt and num_return_sequences > 1
    if one_off:
        prompt_cache = (PromptCache(model, tokenizer, texts), None)
    if prompt_cache is not None:
        enc, cache = prompt_cache[0].take(prompt_cache[1], num_return_sequences, keep=not one_off)
        kwargs["num_return_sequences"] = 1
        if cache is not None:
            kwargs["past_key_values"] = cache
    else:
        tokenizer.padding_side = "left"
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if answer_end:
        kwargs["stopping_criteria"] = StoppingCriteriaList([AnswerEnd(tokenizer, answer_end, enc["input_ids"].shape[1])])
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with warnings.catch_warnings():  # transformers 5 renames past_key_values to cache; 4.x knows only the old name
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = model.generate(**enc, **kwargs, return_dict_in_generate=True, output_scores=return_logprobs)
    seqs = out.sequences[:, enc["input_ids"].shape[1] :]
    lp = None
    if return_logprobs:
        lp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    gens, ntoks, logps = [], [], []
    for i in range(seqs.shape[0]):
        ids = seqs[i].tolist()
        n = len(ids)
        for j, t in enumerate(ids):
            if t in stop or t == tokenizer.pad_token_id:
                n = j + (1 if t in stop else 0)  # the end token counts as generated (it is not decoded)
                break
        gens.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
        ntoks.append(n)
        if lp is not None:
            row = lp[i, : max(n, 1)].float()
            row = row[torch.isfinite(row)]
            logps.append(row.mean().item() if row.numel() else -math.inf)
    k = num_return_sequences
    group = lambda xs: [xs[i * k : (i + 1) * k] for i in range(len(texts))]  # noqa: E731
    return group(gens), group(ntoks), (group(logps) if return_logprobs else None)
