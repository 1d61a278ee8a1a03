"""Fitting a chat into the model's context window, as OneLLM does: the oldest turns go first."""

from server.core.chat import Chat
from server.errors import InputError
from server.model.onellm import OneLLM


class ContextWindow:
    """`model`'s context window; an answer is `default_max_tokens` long unless a request says otherwise."""

    def __init__(self, model: OneLLM, default_max_tokens: int):
        self.model = model
        self.default_max_tokens = default_max_tokens
        self.size = model.config["llm"]["max_positions"]
        self.block_rows = model.config["encoder"]["prefix_tokens"] + 2  # start tag, prefix, end tag

    def fit(self, chat: Chat, max_tokens: int | None) -> tuple[int, list[int], int]:
        """Drop the oldest turns until prompt + answer fit the context window.

        Returns (first kept turn, prompt ids, max_tokens). The current turn is never cut: when it
        alone leaves less room than max_tokens the answer gets what room there is, and when it
        leaves none, that is the client's error.
        """
        wanted = max_tokens or self.default_max_tokens
        starts = [i for i, t in enumerate(chat.turns) if t.role == "user"]
        for start in starts:
            turns = chat.turns[start:]
            ids = self.model.prompt_ids([(t.role, t.text) for t in turns], chat.system)
            length = len(ids) + self.block_rows * sum(len(t.attachments) for t in turns)
            room = self.size - length
            if room >= wanted or (start == starts[-1] and room >= 1):
                return start, ids, min(wanted, room)
        raise InputError(400, f"the current message needs {length} prompt tokens plus max_tokens={wanted}, "
                              f"more than the context window of {self.size} tokens", chat.messages_param)
