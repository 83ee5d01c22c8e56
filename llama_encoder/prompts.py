"""The one rule for which prompt goes before a text, shared by every encoder the package drives (`Encoder`, and
`engines.vllm.VllmEncoder`): at most one of a verbatim `prompt`, a `prompt_name` saved in the checkpoint, or a task
`instruction` written through the checkpoint's template."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from .errors import InputError


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


__all__ = ["choose_prompt"]
