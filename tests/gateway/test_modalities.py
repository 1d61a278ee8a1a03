"""Every modality through `POST /v1/chat` (multipart, as `curl -F` sends it) from a real file in each
accepted format, streamed and not, against the session's real `onellm serve`."""

from dataclasses import dataclass, field

import pytest

import media
from gateway_helpers import expected_prompt_tokens, metric, parse_sse, wait_metric

PROMPT = "What does this show?"
MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "mp4": "video/mp4", "webm": "video/webm",
        "mov": "video/quicktime", "wav": "audio/wav", "flac": "audio/flac", "ogg": "audio/ogg",
        "npy": "application/octet-stream", "ply": "application/octet-stream", "obj": "text/plain",
        "glb": "model/gltf-binary", "csv": "text/csv"}


@dataclass
class Case:
    modality: str
    fmt: str
    uploads: list  # [(field, ext, bytes maker)]
    form: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.modality}-{self.fmt}"

    def files(self, seed: int) -> list:
        return [(name, (f"upload.{ext}", make(ext, seed), MIME[ext])) for name, ext, make in self.uploads]


CASES = (
    [Case("image", f, [("image", f, media.image)]) for f in ("jpg", "png", "webp")]
    + [Case("video", f, [("video", f, media.video)]) for f in ("mp4", "webm", "mov")]
    + [Case("audio", f, [("audio", f, media.audio)]) for f in ("wav", "flac", "ogg")]
    + [Case("point", f, [("point", f, media.point)]) for f in ("npy", "ply", "obj", "glb")]
    + [Case("rgbd", "png+png16", [("image", "png", media.image), ("depth", "png", lambda ext, s: media.depth_map(s))]),
       Case("rgbd", "jpg+png16", [("image", "jpg", media.image), ("depth", "png", lambda ext, s: media.depth_map(s))]),
       Case("rgbn", "jpg+png", [("image", "jpg", media.image), ("normal", "png", lambda ext, s: media.normal_map(s))])]
    + [Case("fmri", f, [("fmri", f, media.fmri)]) for f in ("npy", "csv")]
    + [Case("imu", f, [("imu", f, media.imu)], {"imu_sample_rate": "100"}) for f in ("npy", "csv")]
)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c.id for c in CASES])
def test_every_format_streams_and_is_counted(client, index):
    case = CASES[index]
    requests_before = metric(client, "onellm_requests_total", modality=case.modality, status="200")
    encoder_before = metric(client, "onellm_encoder_runs_total", modality=case.modality)

    response = client.post("/v1/chat", files=case.files(seed=1000 + index),
                           data={"prompt": PROMPT, "max_tokens": "3", **case.form})

    text, chunks = parse_sse(response)
    contents = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(contents) <= 3
    # fresh bytes: the encoder ran once, for this modality
    assert metric(client, "onellm_encoder_runs_total", modality=case.modality) == encoder_before + 1
    assert wait_metric(client, "onellm_requests_total", requests_before + 1,
                       modality=case.modality, status="200") == requests_before + 1


ONE_PER_MODALITY = [0, 3, 6, 10, 13, 15, 17, 19]  # jpg, mp4, wav, ply, rgbd, rgbn, fmri csv, imu csv
assert sorted(CASES[i].modality for i in ONE_PER_MODALITY) == sorted({c.modality for c in CASES})


@pytest.mark.parametrize("index", ONE_PER_MODALITY, ids=lambda i: CASES[i].id)
def test_non_streaming_usage_counts_the_prefix_rows(client, model_dir, index):
    case = CASES[index]
    response = client.post("/v1/chat", files=case.files(seed=2000 + index),
                           data={"prompt": PROMPT, "max_tokens": "2", "stream": "false", **case.form})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == expected_prompt_tokens(model_dir, [("user", PROMPT)], attachments=1)
    assert 1 <= usage["completion_tokens"] <= 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_and_non_stream_give_the_same_greedy_answer(client):
    files = [("image", ("a.png", media.image("png", seed=7), "image/png"))]
    form = {"prompt": "Name three things in it.", "max_tokens": "6", "temperature": "0"}
    streamed, _ = parse_sse(client.post("/v1/chat", files=files, data=form))
    whole = client.post("/v1/chat", files=files, data={**form, "stream": "false"})
    assert whole.status_code == 200, whole.text
    assert whole.json()["choices"][0]["message"]["content"] == streamed


def test_two_attachments_in_one_turn_are_two_blocks(client, model_dir):
    before = metric(client, "onellm_requests_total", modality="mixed", status="200")
    response = client.post(
        "/v1/chat",
        files=[("image", ("a.jpg", media.image("jpg", seed=31), "image/jpeg")),
               ("audio", ("a.wav", media.audio("wav", seed=31), "audio/wav"))],
        data={"prompt": "Does the sound match the picture?", "max_tokens": "2", "stream": "false"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == expected_prompt_tokens(
        model_dir, [("user", "Does the sound match the picture?")], attachments=2)
    assert wait_metric(client, "onellm_requests_total", before + 1, modality="mixed", status="200") == before + 1


@pytest.mark.parametrize("prompt", ["Hello there", "Qu'est-ce que c'est ? 猫と🐱, naïve café"])
def test_text_only_chat(client, model_dir, prompt):
    # curl -F prompt=... with no file: multipart parts without a filename
    multipart = client.post("/v1/chat", files={"prompt": (None, prompt), "max_tokens": (None, "3"),
                                               "stream": (None, "false")})
    urlencoded = client.post("/v1/chat", data={"prompt": prompt, "max_tokens": "3", "stream": "false"})
    as_json = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                        "max_tokens": 3})
    expected = expected_prompt_tokens(model_dir, [("user", prompt)], 0)
    answers = set()
    for response in (multipart, urlencoded, as_json):
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == expected
        answers.add(response.json()["choices"][0]["message"]["content"])
    assert len(answers) == 1
