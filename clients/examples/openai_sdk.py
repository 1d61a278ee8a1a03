"""OneLLM Serve through the `openai` SDK, unchanged: an image question and an audio question, streamed.

    pip install openai
    python openai_sdk.py cat.jpg dog.wav      # ONELLM_URL picks the server (default http://127.0.0.1:8080)
"""

import base64
import mimetypes
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("ONELLM_URL", "http://127.0.0.1:8080") + "/v1",
                api_key=os.environ.get("ONELLM_API_KEY", "unused"))  # the SDK insists on a key


def b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def ask(content: list[dict]) -> None:
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        stream=True,
        max_tokens=128,
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


image = sys.argv[1] if len(sys.argv) > 1 else "cat.jpg"
audio = sys.argv[2] if len(sys.argv) > 2 else "dog.wav"
image_type = mimetypes.guess_type(image)[0] or "image/jpeg"

ask([
    {"type": "text", "text": "What is in this image?"},
    {"type": "image_url", "image_url": {"url": f"data:{image_type};base64,{b64(image)}"}},
])
ask([
    {"type": "text", "text": "What can you hear?"},
    {"type": "input_audio", "input_audio": {"data": b64(audio), "format": os.path.splitext(audio)[1][1:] or "wav"}},
])
