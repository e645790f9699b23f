"""Answer extraction and scoring: numbers, \\boxed{}, short answers (EM/F1), option letters.

Every extractor returns the final answer in a generation, or None when there is none (the
`no_answer_rate` of a report counts those). Scorers return {"correct": bool, ...}.
"""

from __future__ import annotations

import re
import string
from collections import Counter

# ----------------------------------------------------------------------------- answer helpers

# a "-" right after a digit, letter or ")" is subtraction or a range ("2-3 hours"), not a minus sign
_NUM = re.compile(r"(?:(?<![\w)])-)?\$?\d[\d,]*(?:\.\d+)?|(?:(?<![\w)])-)?\.\d+")


def parse_number(text: str | None) -> float | None:
    if text is None:
        return None
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(t)
    except ValueError:
        return None


def last_number(text: str) -> str | None:
    nums = _NUM.findall(text)
    if not nums:
        return None
    return nums[-1].replace(",", "").replace("$", "").rstrip(".")


def extract_gsm8k(text: str) -> str | None:
    """The number after the last '####', else after 'answer is/:', else the last number."""
    if "####" in text:
        n = last_number(text.split("####")[-1].split("\n")[0]) or last_number(text.split("####")[-1])
        if n is not None:
            return n
    m = re.findall(r"answer(?: is)?\s*[:=]?\s*(.*)", text, flags=re.IGNORECASE)
    if m:
        n = last_number(m[-1].split("\n")[0])
        if n is not None:
            return n
    return last_number(text)


def score_numeric(pred: str | None, ex) -> dict:
    a, b = parse_number(pred), parse_number(ex.answer)
    return {"correct": a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))}


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    m = re.match(r"\\(?:boxed|fbox)\s*\{", text[idx:])
    i = idx + m.end() - 1 if m else -1
    if i < 0:
        # \boxed 5
        m = re.match(r"\\boxed\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_math(text: str) -> str | None:
    box = last_boxed(text)
    if box is not None:
        return box.strip()
    m = re.findall(r"answer is\s*:?\s*\$?([^\n$]+)\$?", text, flags=re.IGNORECASE)
    return m[-1].strip().rstrip(".") if m else None


def math_equal(pred: str | None, gold: str) -> bool:
    """Symbolic equivalence by math-verify (string match as a fast path)."""
    if pred is None:
        return False
    if pred.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    try:
        g = parse(f"${gold}$")
        p = parse(f"${pred}$")
        return bool(g) and bool(p) and bool(verify(g, p))
    except Exception:  # math-verify raises on exotic LaTeX or timeouts: count as wrong
        return False


def score_math(pred: str | None, ex) -> dict:
    return {"correct": math_equal(pred, ex.answer)}


def normalize_answer(s: str) -> str:
    """SQuAD/HotpotQA normalization: lower, drop punctuation and articles, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer"):
        if p != g:
            return 0.0
    pt, gt = p.split(), g.split()
    common = Counter(pt) & Counter(gt)
    same = sum(common.values())
    if same == 0:
        return 0.0
    prec, rec = same / len(pt), same / len(gt)
    return 2 * prec * rec / (prec + rec)


def _strip_marks(s: str) -> str:
    """Drop markdown emphasis and quotes around an answer, and a final period."""
    return s.strip().strip("*_`\"' ").rstrip(".").strip("*_`\"' ").strip()


_YES_NO = re.compile(r"^(yes|no)\b(?:\s*$|\s*[,.;:!])", flags=re.IGNORECASE)


def yes_no(answer: str) -> str | None:
    """'yes' or 'no' when the answer is that word, alone or followed by punctuation
    ("No, they are not."); else None. "No Doubt" (a band) stays itself."""
    m = _YES_NO.match(answer.strip())
    return m.group(1).lower() if m else None


_ANSWER_LINE = re.compile(r"answer[ \t]*(?:is)?[ \t]*\**[ \t]*:[ \t]*\**([^\n]*)(?=((?:\n[ \t]*)*)([^\n]*))", re.IGNORECASE)


def extract_short(text: str) -> str | None:
    """The short answer: the text after the last 'Answer:' on its line (or, when that line ends at the
    colon, the next non-empty line), else the first non-empty line that is not a bare 'Answer:';
    'Yes, ...' / 'No, ...' become 'yes' / 'no'. None when there is no answer."""
    found = []
    for m in _ANSWER_LINE.finditer(text):
        same, nxt = _strip_marks(m.group(1)), _strip_marks(m.group(3))
        if same or (nxt and not _ANSWER_LINE.match(nxt)):
            found.append(same or nxt)
    if found:
        ans = found[-1]
    else:
        lines = [_strip_marks(ln) for ln in text.strip().splitlines()]
        lines = [ln for ln in lines if ln and not re.fullmatch(r"(?i).*answer[ \t]*(?:is)?[ \t]*:?", ln)]
        if not lines:
            return None
        ans = lines[0]
    return yes_no(ans) or ans


def score_qa(pred: str | None, ex) -> dict:
    """Exact match and token F1 after SQuAD normalisation. Against a yes/no reference, a prediction
    whose first word is yes or no counts as that word ("No they are not" -> "no")."""
    pred = pred or ""
    gold = normalize_answer(ex.answer)
    if gold in ("yes", "no"):
        words = normalize_answer(pred).split()
        if words and words[0] in ("yes", "no"):
            pred = words[0]
    em = normalize_answer(pred) == gold
    return {"correct": em, "em": float(em), "f1": token_f1(pred, ex.answer)}


LETTERS = "ABCD"


def extract_letter(text: str) -> str | None:
    """The chosen option letter A-D: 'Answer: B', '(B)', 'B.' or a lone letter; else None."""
    m = re.findall(r"answer\s*(?:is)?\s*:?\s*\(?([A-Za-z])\b\)?", text, flags=re.IGNORECASE)
    if m:
        c = m[-1].upper()
        return c if c in LETTERS else None
    cands = re.findall(r"(?:^|[\s(])([A-D])(?:[).:\s]|$)", text.strip())
    return cands[0] if cands else None


def score_letter(pred: str | None, ex) -> dict:
    return {"correct": pred is not None and pred == ex.answer}


def extract_rg(text: str, numeric: bool) -> str | None:
    """<answer>...</answer>, else the text after the last 'Answer:', else the last number / first line."""
    m = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
    if m:
        return m[-1].strip()
    m = re.findall(r"answer\s*(?:is)?\s*:\s*(.*)", text, flags=re.IGNORECASE)
    if m and m[-1].strip():
        ans = m[-1].strip().split("\n")[0].strip().rstrip(".")
        return (last_number(ans) or ans) if numeric else ans
    if numeric:
        return last_number(text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None




# ----------------------------------------------------------------------------- answer keys (floors, diagnostics)


def number_key(answer: str) -> str:
    """A number in one spelling ("1,000.0" -> "1000"); text that is not a number, normalised."""
    x = parse_number(answer)
    if x is None:
        return normalize_answer(answer)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def math_key(answer: str) -> str:
    """A LaTeX answer without spaces, $ signs and \\left/\\right."""
    s = re.sub(r"\\(left|right|!|,|;)", "", answer.strip().strip("$"))
    return re.sub(r"\s+", "", s)


def text_key(answer: str) -> str:
    """A short answer after SQuAD normalisation, yes/no sentences reduced to the word."""
    return yes_no(answer) or normalize_answer(answer)


def letter_key(answer: str) -> str:
    return answer.strip().upper()


# ----------------------------------------------------------------------------- where an answer ends
# Python regexes searched in the text generated so far (common decision 3): generation of a row may
# stop once its text matches, because the final answer is complete and extraction takes it from there.

# '#### 42' or 'The answer is 42' (the embedded model's habit on GSM8K validation) and the end of that line
END_GSM8K = r"(?i)(?:####|answer is)[^\n\d]*-?\$?\d[\d,]*(?:\.\d+)?[^\n]*\n"
END_BOXED = r"\\boxed\s*\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"  # a closed \boxed{...} (3 levels of braces)
END_ANSWER_LINE = r"(?i)</answer>|answer\s*(?:is)?\s*\**\s*:[^\n]*\S[^\n]*\n"  # a complete 'Answer: ...' line
END_LETTER = r"(?i)answer\s*(?:is)?\s*\**\s*:\s*\**\s*\(?[A-D]\b"  # 'Answer: B'
