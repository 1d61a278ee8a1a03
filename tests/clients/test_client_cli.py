"""`onellm chat` run as people run it: a subprocess talking to the live gateway."""

import json
import socket
import subprocess
import sys

import pytest

from client_helpers import REPO, clean_env
from onellm_client import Client

MAX_TOKENS = "5"


def onellm_chat(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "chat", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120, env=env or clean_env())


@pytest.fixture(scope="module")
def expected(gateway, media) -> str:
    """The greedy answer the CLI should print for the image question."""
    with Client(gateway) as client:
        return client.chat("What is in this image?", image=media["image"], max_tokens=int(MAX_TOKENS),
                           stream=False).text


def test_streams_the_answer(gateway, media, expected):
    done = onellm_chat("--url", gateway, "--image", str(media["image"]), "--max-tokens", MAX_TOKENS,
                       "What is in this image?")
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"
    assert done.stderr == ""


def test_json_prints_the_chat_completion(gateway, media, expected):
    done = onellm_chat("--url", gateway, "--image", str(media["image"]), "--max-tokens", MAX_TOKENS, "--json",
                       "What is in this image?")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["completion_tokens"] <= int(MAX_TOKENS)


def test_no_stream_and_url_from_the_environment(gateway, media, expected):
    env = {**clean_env(), "ONELLM_URL": gateway}
    done = onellm_chat("--image", str(media["image"]), "--max-tokens", MAX_TOKENS, "--no-stream",
                       "What is in this image?", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected + "\n"


def test_every_modality_flag(gateway, media):
    done = onellm_chat("--url", gateway, "--max-tokens", "2", "--image", str(media["image"]),
                       "--depth", str(media["depth"]), "--video", str(media["video"]), "--audio", str(media["audio"]),
                       "--point", str(media["point"]), "--fmri", str(media["fmri"]), "--imu", str(media["imu"]),
                       "--imu-sample-rate", "100", "--json", "Describe all of these.")
    assert done.returncode == 0, done.stderr
    # seven uploads, six attachments (the depth map joins the image): six blocks of 32 rows
    assert json.loads(done.stdout)["usage"]["prompt_tokens"] > 6 * 32


def test_a_server_error_exits_1_with_its_message(gateway, media):
    done = onellm_chat("--url", gateway, "--audio", str(media["image"]), "What do you hear?")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("error: field 'audio' holds an image")
    assert done.stderr.endswith("(param: audio)\n")
    assert "Traceback" not in done.stderr


def test_local_mistakes_exit_1_without_a_traceback(tmp_path):
    missing = onellm_chat("--image", str(tmp_path / "nope.png"), "Hi")
    assert missing.returncode == 1
    assert missing.stderr == f"error: cannot read {tmp_path / 'nope.png'}: No such file or directory\n"
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        unreachable = onellm_chat("--url", url, "Hi")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith(f"error: could not talk to {url}")
    assert "Traceback" not in unreachable.stderr


def test_interactive_conversation_keeps_history(gateway, media):
    lines = ["Hello there.", f"/image {media['image']}", "/files", "What is in this image?",
             "/audio /no/such/file.wav", "/nonsense", "/quit", "never sent"]
    done = onellm_chat("--url", gateway, "--max-tokens", "3", stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    with Client(gateway) as client:  # the same conversation through a session
        session = client.session()
        first = session.chat("Hello there.", max_tokens=3, stream=False).text
        second = session.chat("What is in this image?", image=media["image"], max_tokens=3, stream=False).text
    assert done.stdout == f"{first}\n{second}\n"
    assert "random weights" in done.stderr
    assert f"attached {media['image']} as image" in done.stderr
    assert f"image: {media['image']}" in done.stderr
    assert "error: no such file: /no/such/file.wav" in done.stderr
    assert "unknown command /nonsense" in done.stderr


def test_interactive_errors_do_not_end_the_conversation(gateway, media):
    stdin = f"/audio {media['image']}\nWhat do you hear?\nHello\n"
    done = onellm_chat("--url", gateway, "--max-tokens", "2", stdin=stdin)
    assert done.returncode == 0
    assert "error: field 'audio' holds an image" in done.stderr
    with Client(gateway) as client:  # the failed turn left no trace in the history
        assert done.stdout == client.chat("Hello", max_tokens=2, stream=False).text + "\n"
