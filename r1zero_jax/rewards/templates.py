"""Prompt templates of the paper's code (Liu et al. 2025), by name."""

TEMPLATES = {
    "qwen_math": (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "r1": (
        "A conversation between User and Assistant. The User asks a question, and the Assistant "
        "solves it. The Assistant first thinks about the reasoning process in the mind and then "
        "provides the User with the answer. The reasoning process is enclosed within <think> "
        "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
        "<think> reasoning process here </think> <answer> answer here </answer>.\nUser: "
        "{question}\nAssistant: <think>"
    ),
    "no": "{question}",
}

# Where a response under each template ends; the sampler stops after it (kept in the output).
# qwen_math is a ChatML prompt: the turn ends with <|im_end|>, a special token wherever the
# tokenizer has one (then a stop id), which base models' generation configs do not list.
STOP_STRINGS = {"qwen_math": ("<|im_end|>",), "r1": ("</answer>",), "no": ()}


def check_template(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return name


def apply_template(name: str, question: str) -> str:
    """The prompt text for `question` under template `name` (str.replace: questions hold braces)."""
    return TEMPLATES[check_template(name)].replace("{question}", question)
