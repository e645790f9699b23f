"""The generator's rewrite input (p~, x) as chat messages, and cleaning of a generated prompt.

Shared by MetaTuner (prompt decoder), BPO (the rewriter) and anything else that asks a model to
rewrite an instruction for one query."""

from __future__ import annotations

REWRITE_SYSTEM = "Rewrite the instruction for this question. Reply with the new instruction only."


def rewrite_messages(prompt: str, query: str) -> list[dict]:
    """The generator's input (p~, x) as chat messages (a system turn keeps templates from adding
    their own default system prompt, so the prefix stays short)."""
    return [{"role": "system", "content": REWRITE_SYSTEM},
            {"role": "user", "content": f"Instruction: {prompt.strip()}\nQuestion: {query}"}]


def clean_prompt(text: str, fallback: str) -> str:
    """A generated prompt, stripped; p~ when the generator produced nothing usable."""
    text = text.strip()
    return text if len(text) >= 3 else fallback
