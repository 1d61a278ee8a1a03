"""The Python client against a live gateway: every modality, streamed and not, sessions, typed errors."""

import asyncio
import socket

import numpy as np
import pytest

from onellm_client import (APIConnectionError, AsyncChatStream, AsyncClient, BadRequestError, ChatResult, ChatStream,
                           Client, MediaNotFoundError, NotFoundError, OneLLMError, ServiceUnavailableError,
                           UnprocessableError, UnsupportedMediaError)
from gateway_process import GatewayProcess
from scraped_metrics import total
from vllm_standin import CUT_AFTER_TEXT, HOLD, RECORDED_DELTAS, StandInVLLM

# the upload fields of each modality; depth and normal maps travel with an image
MODALITIES = {"image": ["image"], "video": ["video"], "audio": ["audio"], "point": ["point"], "fmri": ["fmri"],
              "imu": ["imu"], "rgbd": ["image", "depth"], "rgbn": ["image", "normal"]}
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def client(gateway):
    with Client(gateway) as client:
        yield client


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_modality_streams_and_matches_the_whole_answer(client, media, modality):
    files = {field: media[field] for field in MODALITIES[modality]}
    with client.chat("What is this?", max_tokens=MAX_TOKENS, **files) as stream:
        assert isinstance(stream, ChatStream)
        deltas = list(stream)
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    assert stream.text == "".join(deltas)
    assert stream.finish_reason in ("stop", "length")

    result = client.chat("What is this?", max_tokens=MAX_TOKENS, stream=False, **files)
    assert isinstance(result, ChatResult)
    assert result.text == stream.text  # greedy: the same answer either way
    assert result.finish_reason == stream.finish_reason
    usage = result.usage
    assert usage["prompt_tokens"] > 32  # the attachment's block: start tag, 30 prefix rows, end tag
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result.raw["object"] == "chat.completion"


def test_files_as_bytes_and_open_files(client, media):
    by_path = client.chat("Describe it.", image=media["image"], max_tokens=MAX_TOKENS, stream=False)
    by_bytes = client.chat("Describe it.", image=media["image"].read_bytes(), max_tokens=MAX_TOKENS, stream=False)
    with open(media["image"], "rb") as f:
        by_file = client.chat("Describe it.", image=f, max_tokens=MAX_TOKENS, stream=False)
    assert by_path.text == by_bytes.text == by_file.text


def test_imu_sample_rate_reaches_the_server(client, media):
    assert client.chat("Motion?", imu=media["imu"], imu_sample_rate=50, max_tokens=2, stream=False).text
    with pytest.raises((BadRequestError, UnprocessableError)) as error:  # refused by the form or the decoder
        client.chat("Motion?", imu=media["imu"], imu_sample_rate=-1, stream=False)
    assert error.value.param in ("imu_sample_rate", "imu")


def test_sampling_options_reach_the_server(client):
    short = client.chat("Tell me a story.", max_tokens=2, stream=False)
    assert short.usage["completion_tokens"] <= 2 and short.finish_reason == "length"
    seeded = [client.chat("Tell me a story.", temperature=1.0, top_p=0.9, seed=7, max_tokens=6, stream=False).text
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    with pytest.raises(BadRequestError) as error:
        client.chat("x", stop=[""], stream=False)
    assert error.value.param == "stop"


def test_session_second_turn_carries_the_first_by_its_uuid(client, gateway, media):
    session = client.session()
    first = session.chat("What is in this image?", image=media["image"], max_tokens=MAX_TOKENS)
    first_text = first.result().text
    [uuid] = first.media  # the server's name for the image (X-Media-UUIDs)
    image = media["image"].read_bytes()
    assert session.history == [{"role": "user", "content": "What is in this image?", "files": [("image", image)],
                                "media": [uuid]},
                               {"role": "assistant", "content": first_text}]
    served = total(gateway, "onellm_media_references_total", outcome="served")
    second = session.chat("What colour is it?", max_tokens=MAX_TOKENS, stream=False)
    assert total(gateway, "onellm_media_references_total", outcome="served") == served + 1  # not sent again
    assert second.media == [uuid]

    # the same turn with the image's bytes in the history gives the same prompt and greedy answer
    with_bytes = [{k: v for k, v in m.items() if k != "media"} for m in session.history[:2]]
    by_hand = client.chat("What colour is it?", history=with_bytes, max_tokens=MAX_TOKENS, stream=False)
    text_only = [{k: v for k, v in m.items() if k not in ("files", "media")} for m in session.history[:2]]
    without_image = client.chat("What colour is it?", history=text_only, max_tokens=MAX_TOKENS, stream=False)
    alone = client.chat("What colour is it?", max_tokens=MAX_TOKENS, stream=False)
    assert second.text == by_hand.text
    # the first turn's image stays in the prompt: its 32 rows are counted again
    assert second.usage["prompt_tokens"] == by_hand.usage["prompt_tokens"] == without_image.usage["prompt_tokens"] + 32
    assert without_image.usage["prompt_tokens"] > alone.usage["prompt_tokens"]
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]

    session.clear()
    assert client.chat("What colour is it?", max_tokens=MAX_TOKENS, stream=False).text == alone.text


def test_session_sends_the_files_again_when_the_server_no_longer_holds_them(client, gateway, media):
    session = client.session()
    session.chat("What happens?", video=media["video"], max_tokens=MAX_TOKENS, stream=False)
    [uuid] = session.history[0]["media"]
    session.history[0]["media"] = ["expired-long-ago"]  # as the server sees a uuid whose entry is gone
    not_found = total(gateway, "onellm_media_references_total", outcome="not_found")
    second = session.chat("And then?", max_tokens=MAX_TOKENS)
    text = second.result().text
    assert total(gateway, "onellm_media_references_total", outcome="not_found") == not_found + 1
    assert session.history[0]["media"] == [uuid]  # the bytes went up again, and their uuid came back
    resent = [{k: v for k, v in m.items() if k != "media"} for m in session.history[:2]]
    assert text == client.chat("And then?", history=resent, max_tokens=MAX_TOKENS, stream=False).text

    with pytest.raises(MediaNotFoundError) as caught:  # a uuid the client sent itself is its own to fix
        client.chat("And then?", history=[{"role": "user", "content": "Look.", "files": [("video", b"")],
                                           "media": ["never-sent"]}, {"role": "assistant", "content": "Ok."}],
                    stream=False)
    assert (caught.value.status, caught.value.code) == (400, "media_not_found")
    assert isinstance(caught.value, BadRequestError)


def test_session_refers_to_an_image_and_its_depth_map_by_one_uuid(client, gateway, media):
    session = client.session()
    session.chat("How far is the wall?", image=media["image"], depth=media["depth"], audio=media["audio"],
                 max_tokens=MAX_TOKENS, stream=False)
    image_uuid, audio_uuid = session.history[0]["media"]  # rgbd, then the audio: the order the server made them
    served = total(gateway, "onellm_media_references_total", outcome="served")
    second = session.chat("And the sound?", max_tokens=MAX_TOKENS, stream=False)
    assert total(gateway, "onellm_media_references_total", outcome="served") == served + 2
    assert second.media == [image_uuid, audio_uuid]
    resent = [{k: v for k, v in m.items() if k != "media"} for m in session.history[:2]]
    assert second.text == client.chat("And the sound?", history=resent, max_tokens=MAX_TOKENS, stream=False).text


def test_a_failed_turn_is_not_remembered(client, media):
    session = client.session(system="You answer briefly.")
    session.chat("Hello", max_tokens=2, stream=False)
    with pytest.raises(UnsupportedMediaError):
        session.chat("Listen", audio=media["image"])
    assert len(session.history) == 2


def test_png_sent_as_audio_is_415(client, media):
    with pytest.raises(UnsupportedMediaError) as caught:
        client.chat("What do you hear?", audio=media["image"])
    error = caught.value
    assert (error.status, error.type, error.param) == (415, "unsupported_media_type", "audio")
    assert "image" in error.message
    assert error.body == {"error": {"type": error.type, "message": error.message, "param": "audio", "code": None}}
    assert str(error) == f"{error.message} (param: audio)"


def test_depth_without_image_is_400(client, media):
    with pytest.raises(BadRequestError) as caught:
        client.chat("How far?", depth=media["depth"], stream=False)
    assert (caught.value.status, caught.value.param) == (400, "depth")
    assert "image" in caught.value.message


def test_unreadable_content_and_unknown_model(client, tmp_path):
    wrong_shape = tmp_path / "short_fmri.npy"
    np.save(wrong_shape, np.zeros(10, np.float32))
    with pytest.raises(UnprocessableError) as caught:
        client.chat("Brain?", fmri=wrong_shape)
    assert (caught.value.status, caught.value.param) == (422, "fmri")
    with pytest.raises(NotFoundError) as caught:
        client.chat("Hi", model="no-such-model")
    assert (caught.value.status, caught.value.param) == (404, "model")


def test_models_health_ready(client):
    [model] = client.models()
    assert model["random_weights"] is True
    assert set(model["modalities"]) == set(MODALITIES)
    assert client.health() and client.ready()


def test_unreachable_server():
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with Client(url, timeout=5) as client:
            assert not client.health() and not client.ready()
            with pytest.raises(APIConnectionError) as caught:
                client.chat("Hi")
    assert caught.value.status is None and isinstance(caught.value, OneLLMError)


@pytest.fixture
def over_standin(tiny_model, tmp_path):
    """A gateway of its own (its failures are logged with tracebacks, on purpose) over a stand-in
    vLLM that sends the first text of its recorded answer, then fails as it is told."""
    standin = StandInVLLM()
    server = GatewayProcess(tiny_model, tmp_path, ["--vllm-url", standin.url, "--log-level", "warning"]).start()
    yield server, standin
    standin.release.set()
    server.stop()
    standin.stop()


def test_error_event_mid_stream_raises_after_the_text_before_it(over_standin):
    server, standin = over_standin
    standin.completions = CUT_AFTER_TEXT  # the backend's connection drops after the first text
    with Client(server.url) as client, client.chat("Hi") as stream:
        received = []
        with pytest.raises(ServiceUnavailableError) as caught:
            for delta in stream:
                received.append(delta)
    assert received == RECORDED_DELTAS[:1]
    assert (caught.value.status, caught.value.type) == (503, "service_unavailable")
    # the gateway's own words (the canned body this test read before had made up "mid-answer")
    assert "LLM engine is unavailable" in caught.value.message


def test_a_stream_cut_before_done_is_a_connection_error(over_standin):
    server, standin = over_standin
    standin.completions = HOLD  # the first text, then nothing until released
    with Client(server.url) as client, client.chat("Hi") as stream:
        assert next(iter(stream)) == RECORDED_DELTAS[0]
        server.process.kill()  # the gateway dies mid-answer: no error event, no [DONE]
        with pytest.raises(APIConnectionError):
            stream.result()


def test_async_client(gateway, media):
    async def main():
        async with AsyncClient(gateway) as client:
            stream = await client.chat("What is in this image?", image=media["image"], max_tokens=MAX_TOKENS)
            assert isinstance(stream, AsyncChatStream)
            deltas = [delta async for delta in stream]
            whole = await client.chat("What is in this image?", image=media["image"], max_tokens=MAX_TOKENS,
                                      stream=False)
            assert "".join(deltas) == whole.text and deltas

            session = client.session()
            first = await session.chat("What is in this image?", image=media["image"], max_tokens=MAX_TOKENS)
            await first.result()
            assert session.history[0]["media"] == first.media and len(first.media) == 1
            session.history[0]["media"] = ["expired-long-ago"]  # gone: the session sends the image again
            second = await session.chat("And its colour?", max_tokens=MAX_TOKENS, stream=False)
            assert len(session.history) == 4 and session.history[3]["content"] == second.text
            assert session.history[0]["media"] == first.media

            with pytest.raises(UnsupportedMediaError):
                await client.chat("Hear?", audio=media["image"])
            assert (await client.models())[0]["random_weights"] and await client.ready()

    asyncio.run(main())
