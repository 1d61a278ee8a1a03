"""The synchronous client and its multi-turn session."""

import os
from collections.abc import Sequence

import httpx

from onellm_client import __version__
from onellm_client._wire import (ATTACHMENT_FIELDS, UPLOAD_FIELDS, ChatResult, FileInput, build_request, read_file,
                                 result_from_completion)
from onellm_client.errors import MediaNotFoundError, error_from_response, transport_errors
from onellm_client.streams import ChatStream

DEFAULT_URL = "http://127.0.0.1:8080"
# CPU decoding of a long answer can take minutes; connecting should not
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


def client_settings(base_url: str | None, api_key: str | None) -> tuple[str, dict]:
    """(base URL, headers), from the arguments or the ONELLM_URL / ONELLM_API_KEY environment."""
    base_url = base_url or os.environ.get("ONELLM_URL") or DEFAULT_URL
    api_key = api_key or os.environ.get("ONELLM_API_KEY")
    headers = {"User-Agent": f"onellm-client/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return base_url.rstrip("/"), headers


class Client:
    """`Client("http://127.0.0.1:8080")`; `for delta in client.chat("Describe it", image="cat.jpg"): ...`"""

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT):
        self.base_url, headers = client_settings(base_url, api_key)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def chat(self, prompt: str, *, image: FileInput | None = None, video: FileInput | None = None,
             audio: FileInput | None = None, point: FileInput | None = None, depth: FileInput | None = None,
             normal: FileInput | None = None, fmri: FileInput | None = None, imu: FileInput | None = None,
             imu_sample_rate: float | None = None, history: Sequence[dict] | None = None,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             stop: str | Sequence[str] | None = None, seed: int | None = None, model: str | None = None,
             stream: bool = True) -> ChatStream | ChatResult:
        """One turn. Files are paths, bytes or open binary files; `depth`/`normal` go with `image`.
        `history` holds earlier turns as [{"role", "content"}], a user turn optionally with its
        `files` ([(field, file)]) and their `media` (the uuids the server returned for them: see
        ChatResult.media), which are then sent instead of the files.

        Streaming returns a ChatStream yielding text deltas; otherwise a ChatResult.
        Errors, including one the server reports mid-stream, raise a OneLLMError subclass."""
        uploads = {"image": image, "video": video, "audio": audio, "point": point, "depth": depth,
                   "normal": normal, "fmri": fmri, "imu": imu}
        request = build_request(prompt, history, uploads, stream, imu_sample_rate, max_tokens, temperature,
                                top_p, stop, seed, model)
        response = self._send("POST", "/v1/chat", stream, data=request.data, files=request.files)
        if stream:
            return ChatStream(response)
        return result_from_completion(response.json(), response.headers)

    def session(self, system: str | None = None) -> "Session":
        return Session(self, system)

    def models(self) -> list[dict]:
        """The served models: id, modalities, and `random_weights` (True: answers are meaningless)."""
        return self._send("GET", "/v1/models").json()["data"]

    def health(self) -> bool:
        """Whether the server process answers."""
        return self._probe("/health")

    def ready(self) -> bool:
        """Whether the model is loaded and the LLM engine answers."""
        return self._probe("/ready")

    def _probe(self, path: str) -> bool:
        try:
            return self._http.get(path).status_code == 200
        except httpx.HTTPError:
            return False

    def _send(self, method: str, path: str, stream: bool = False, **kwargs) -> httpx.Response:
        with transport_errors(self.base_url):
            response = self._http.send(self._http.build_request(method, path, **kwargs), stream=stream)
            if response.status_code >= 400:
                response.read()
                response.close()
                raise error_from_response(response)
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Conversation:
    """History kept by Session and AsyncSession.

    A turn is remembered once its answer is complete, so a failed or abandoned turn can be retried.
    Files belong to their turn and stay in the conversation, so the model keeps seeing them: later
    turns send the uuids the server returned for them instead of their bytes, and when the server
    no longer holds one (MediaNotFoundError), the turn goes again with the files themselves."""

    def __init__(self, client, system: str | None = None):
        self.client = client
        self.system = system
        self.history: list[dict] = []

    def clear(self) -> None:
        self.history.clear()

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    @staticmethod
    def _read_uploads(options: dict) -> list[tuple[str, bytes]]:
        """Reads this turn's files once (an open file can be read only once) into `options` and the history."""
        files = []
        for name in UPLOAD_FIELDS:
            if options.get(name) is not None:
                options[name] = read_file(options[name], name)[1]
                files.append((name, options[name]))
        return files

    def _track(self, prompt: str, answer, files: list[tuple[str, bytes]]):
        def remember(result: ChatResult) -> None:
            user = {"role": "user", "content": prompt} | ({"files": files} if files else {})
            self.history += [user, {"role": "assistant", "content": result.text}]
            self._remember_media(result.media)

        if isinstance(answer, ChatResult):
            remember(answer)
        else:
            answer.on_done = remember
        return answer

    def _remember_media(self, media: list[str]) -> None:
        """Gives each turn's files the uuids the server returned: the prompt's attachments in order,
        so the newest turn's are last (turns dropped to fit the context window get none)."""
        rest = list(media)
        for message in reversed(self.history):
            count = sum(name in ATTACHMENT_FIELDS for name, _ in message.get("files", ()))
            if not count:
                continue
            if len(rest) < count:
                break
            message["media"], rest = rest[-count:], rest[:-count]

    def _forget_media(self) -> bool:
        """Back to sending every earlier turn's files; False when none was sent by uuid."""
        forgotten = [message.pop("media") for message in self.history if "media" in message]
        return bool(forgotten)


class Session(Conversation):
    """A conversation with a Client: each `chat` sends the earlier turns' text as history."""

    def chat(self, prompt: str, *, stream: bool = True, **options) -> ChatStream | ChatResult:
        """As `Client.chat`, with this session's history."""
        files = self._read_uploads(options)
        try:
            answer = self.client.chat(prompt, history=self._messages(), stream=stream, **options)
        except MediaNotFoundError:
            if not self._forget_media():
                raise
            answer = self.client.chat(prompt, history=self._messages(), stream=stream, **options)
        return self._track(prompt, answer, files)
