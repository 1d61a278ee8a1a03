"""The examples in clients/examples, run as written against the live gateway, so they cannot rot."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client_helpers import REPO, clean_env
from missing import unavailable
from onellm_client import Client

EXAMPLES = REPO / "clients" / "examples"


@pytest.fixture(scope="module")
def example_files(media, tmp_path_factory) -> Path:
    """A folder holding the files the examples name (cat.jpg, dog.wav, ...)."""
    folder = tmp_path_factory.mktemp("examples")
    Image.open(media["image"]).save(folder / "cat.jpg")
    Image.open(media["image"]).save(folder / "room.jpg")
    for name, field in [("clip.mp4", "video"), ("dog.wav", "audio"), ("chair.npy", "point"), ("scan.npy", "fmri"),
                        ("room_depth.png", "depth"), ("room_normal.png", "normal"), ("walk.csv", "imu")]:
        shutil.copy(media[field], folder / name)
    return folder


def test_curl_examples(gateway, example_files):
    blocks = re.findall(r"```sh\n(.*?)```", (EXAMPLES / "curl.md").read_text(), re.S)
    script = "\n".join(blocks).replace("URL=http://127.0.0.1:8080", f"URL={gateway}")
    done = subprocess.run(["bash", "-e", "-c", script], cwd=example_files, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    streams = script.count("curl -N")
    assert streams == 8 + 8 + 1  # every modality through both endpoints, and a conversation
    assert done.stdout.count("data: [DONE]") == streams
    assert "event: error" not in done.stdout
    assert done.stdout.count('"object":"chat.completion"') == 1  # the stream=false one
    # the one documented error, and no other
    assert done.stdout.count('"error"') == 1 and '"param":"audio"' in done.stdout


def test_openai_sdk_example(gateway, example_files):
    done = subprocess.run([sys.executable, str(EXAMPLES / "openai_sdk.py"), "cat.jpg", "dog.wav"], cwd=example_files,
                          capture_output=True, text=True, timeout=120, env={**clean_env(), "ONELLM_URL": gateway})
    assert done.returncode == 0, done.stderr
    with Client(gateway) as client:  # both endpoints give the same greedy answer
        image = client.chat("What is in this image?", image=example_files / "cat.jpg", max_tokens=128, stream=False)
        audio = client.chat("What can you hear?", audio=example_files / "dog.wav", max_tokens=128, stream=False)
    assert done.stdout == f"{image.text}\n{audio.text}\n"


def test_fetch_sse_example(gateway, example_files):
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (make system-packages installs it)")
    done = subprocess.run([node, str(EXAMPLES / "fetch_sse.js"), "cat.jpg", "What is in this image?"],
                          cwd=example_files, capture_output=True, text=True, timeout=120,
                          env={**clean_env(), "ONELLM_URL": gateway})
    assert done.returncode == 0, done.stderr
    with Client(gateway) as client:
        expected = client.chat("What is in this image?", image=example_files / "cat.jpg", stream=False)
    assert done.stdout == expected.text + "\n"
