"""The one rule for which prompt goes before a text, shared by every encoder the package drives (`Encoder`, and
`engines.vllm.VllmEncoder`): at most one of a verbatim `prompt`, a `prompt_name` saved in the checkpoint, or a task
`instruction` written through the checkpoint's template. Also what a prompt may be named: training names the prompt
of each task it trains, and a checkpoint saves those prompts under their names."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from .errors import InputError

NO_PROMPT = "plain"
"""The prompt name that asks for no prompt (`evaluate`, `MTEBEncoder`; what verification calls the inputs
without one), so no checkpoint saves a prompt by that name."""
# Names a trained task prompt cannot take: a checkpoint's `document` prompt is the one documents get (training
# gives them none), and `plain` is what verification calls the inputs without a prompt.
RESERVED_PROMPT_NAMES = ("document", NO_PROMPT)


def prompt_name_problem(name: object) -> str | None:
    """Why `name` cannot name a trained task prompt (one sentence), or None when it can: letters, digits, '_' or
    '-', and not one of `RESERVED_PROMPT_NAMES`."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        return f"prompt_name {name!r} must be letters, digits, '_' or '-'"
    if name in RESERVED_PROMPT_NAMES:
        return (f"prompt_name {name!r} is reserved ('document' is the prompt documents get, 'plain' the inputs "
                "without a prompt); choose another name")
    return None


def named_instructions(entries: Iterable[tuple[str, str, str, str]]) -> dict[str, str]:
    """`{prompt name: instruction}` over `entries` of (where, label, prompt name, instruction), in order: the one
    rule that a prompt name holds one instruction. Raises `InputError` at the first entry that gives a name another
    instruction, naming both entries (`where` locates it, `label` names it in another entry's message)."""
    named: dict[str, tuple[str, str]] = {}
    for where, label, name, instruction in entries:
        earlier_instruction, earlier_label = named.setdefault(name, (instruction, label))
        if earlier_instruction != instruction:
            raise InputError(f"{where}: its instruction {instruction!r} would be prompt {name!r}, which "
                             f"{earlier_label} trains with {earlier_instruction!r}; give one of them another "
                             "prompt_name in the recipe (datasets share a prompt name only with the same "
                             "instruction).")
    return {name: instruction for name, (instruction, _) in named.items()}


def choose_prompt(prompts: Mapping[str, str], instruction_prompt: Callable[[str], str], *, prompt: str | None,
                  prompt_name: str | None, instruction: str | None) -> str | None:
    """The prompt to use: `prompt` as given, the checkpoint's `prompts[prompt_name]`, or `instruction_prompt(
    instruction)`; None when none is given. Raises `InputError` for more than one, or an unknown `prompt_name`."""
    if sum(x is not None for x in (prompt, prompt_name, instruction)) > 1:
        raise InputError("Give at most one of prompt, prompt_name and instruction.")
    if prompt_name is not None:
        if prompt_name not in prompts:
            raise InputError(f"No prompt named {prompt_name!r}; this checkpoint has {sorted(prompts)}.")
        return prompts[prompt_name]
    if instruction is not None:
        return instruction_prompt(instruction)
    return prompt


__all__ = ["RESERVED_PROMPT_NAMES", "choose_prompt", "prompt_name_problem"]
