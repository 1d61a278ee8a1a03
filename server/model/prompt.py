"""Chat template "v1" and prompt assembly (ONELLM.md §3).

The LLM input is `[E(BOS), block_1, ..., block_n, E(ids[1:])]`: attachment blocks sit right after
BOS, before the system prompt, in upload order; one attachment reproduces OneLLM exactly.
"""

from collections.abc import Sequence

import torch

ROLES = {"user": "Human", "assistant": "Assistant"}


def render(turns: Sequence[tuple[str, str]], system: str) -> str:
    """[(role, text), ...] ending with a user turn -> the v1 prompt, open for the assistant's answer."""
    text = system + "\n\n"
    for role, content in turns:
        text += f"###{ROLES[role]}: {content}\n"
    return text + "###Assistant:"


def assemble(bos: torch.Tensor, blocks: Sequence[torch.Tensor], rest: torch.Tensor) -> torch.Tensor:
    """E(BOS) [1, D], blocks [32, D] each, E(ids[1:]) [n, D] -> prompt embeddings [1 + 32k + n, D]."""
    return torch.cat([bos, *blocks, rest])
