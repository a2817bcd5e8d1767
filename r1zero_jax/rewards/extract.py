"""Final-answer extraction from a model response, per prompt template (linear time, no regex)."""

from r1zero_jax.rewards.templates import check_template

# A sampler with an 8k-token budget writes well under 100 kB; anything past this is hostile or
# runaway text and earns no reward (extraction stays linear either way, this only bounds the work).
MAX_RESPONSE_CHARS = 1_000_000

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (balanced braces) or `\\boxed 5`."""
    start, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(cmd)
    if i < len(text) and (text[i].isalpha()):  # e.g. \boxedanswer is another command
        return None
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        if i == start + len(cmd):  # `\boxed5`: not LaTeX for a boxed 5
            return None
        end = i
        while end < len(text) and text[end] not in " \n\t$":
            end += 1
        return text[i:end] or None
    depth, j = 0, i
    while j < len(text):
        ch = text[j]
        if ch == "\\":  # escaped brace (\{ \}) does not count
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None  # unbalanced: truncated response


def _r1_answer(text: str) -> str | None:
    # The paper's strict format: both markers present, answer = text after the last <answer>.
    if "</think> <answer>" not in text or "</answer>" not in text:
        return None
    body = text[text.rfind("<answer>") + len("<answer>") :]
    end = body.find("</answer>")
    if end >= 0:
        body = body[:end]
    boxed = last_boxed(body)
    return boxed if boxed is not None else body.strip()


def extract_answer(response: str, template: str) -> str | None:
    """The final answer string of `response` under `template`, or None (reward 0)."""
    check_template(template)
    if not isinstance(response, str) or len(response) > MAX_RESPONSE_CHARS:
        return None
    ans = _r1_answer(response) if template == "r1" else last_boxed(response)
    if ans is None or not ans.strip():
        return None
    return ans.strip()
