"""The web chat page at `/` in headless Chromium (Debian's, driven by Playwright): attach files,
ask, watch the answer stream in, keep the conversation, show the server's errors."""

import re
from pathlib import Path

import pytest

from client_helpers import REPO
from onellm_client import Client
from scraped_metrics import total

pytestmark = pytest.mark.browser

SCREENSHOT = REPO / "test-artifacts" / "page.png"
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture
def page(browser, gateway):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page_errors = []
    page.on("pageerror", lambda error: page_errors.append(error))
    page.goto(gateway + "/")
    page.wait_for_selector("#notice:not([hidden])")  # the tiny model has random weights
    yield page
    context.close()
    assert not page_errors, page_errors


def ask(page, prompt: str, *files: Path) -> None:
    if files:
        page.set_input_files("#file", [str(f) for f in files])
    page.fill("#prompt", prompt)
    page.click("#send")


def wait_for_answer(page, index: int) -> str:
    """The text of the index-th answer once it has finished streaming."""
    answer = page.locator(".message.assistant").nth(index)
    answer.locator(".text").filter(has_text=re.compile(r"\S")).wait_for(timeout=ANSWER_TIMEOUT_MS)  # text streams in
    page.wait_for_selector(".message.assistant.streaming", state="detached", timeout=ANSWER_TIMEOUT_MS)  # and ends
    return answer.locator(".text").text_content()


def test_image_question_streams_an_answer_and_the_conversation_continues(page, media, gateway):
    assert "random weights" in page.inner_text("#notice")
    assert "image" in page.inner_text("#model")  # the model's modalities

    page.set_input_files("#file", str(media["image"]))
    assert page.locator(".attachment img").count() == 1  # previewed before sending
    assert page.input_value(".attachment select") == "image"
    page.click("summary")
    page.fill("#max-tokens", "12")
    page.fill("#prompt", "What is in this image?")
    page.click("#send")
    first = wait_for_answer(page, 0)
    assert first.strip()
    assert page.locator(".message.user img").count() == 1
    assert page.locator("#attachments .attachment").count() == 0

    served = total(gateway, "onellm_media_references_total", outcome="served")
    ask(page, "What colour is it?")
    second = wait_for_answer(page, 1)
    # the image went up once: the second turn named it by its uuid
    assert total(gateway, "onellm_media_references_total", outcome="served") == served + 1
    # Playwright keeps no body for requests that carry files, so check what the page sent by its effect:
    # the same greedy turn from the Python client, with the first turn's image in the history
    expected, without_image = second_turn_by_client(gateway, media, first, "What colour is it?")
    assert second == expected
    assert second != without_image
    assert second.strip()

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))


def second_turn_by_client(gateway, media, first: str, prompt: str) -> tuple[str, str]:
    """(the answer with the image's bytes in the history, the answer without the image)."""
    with Client(gateway) as client:
        history = [{"role": "user", "content": "What is in this image?", "files": [("image", media["image"])]},
                   {"role": "assistant", "content": first}]
        with_image = client.chat(prompt, history=history, max_tokens=12, stream=False).text
        without_image = client.chat(prompt, history=[{k: v for k, v in m.items() if k != "files"}
                                                     for m in history], max_tokens=12, stream=False).text
    return with_image, without_image


def test_a_file_the_server_no_longer_holds_goes_up_again(page, media, gateway):
    page.click("summary")
    page.fill("#max-tokens", "12")
    ask(page, "What is in this image?", media["image"])
    first = wait_for_answer(page, 0)
    [uuid] = page.evaluate("history[0].media")
    page.evaluate("history[0].media = ['expired-long-ago']")  # as the server sees a uuid whose entry is gone
    not_found = total(gateway, "onellm_media_references_total", outcome="not_found")
    ask(page, "Where was it taken?")
    second = wait_for_answer(page, 1)
    assert total(gateway, "onellm_media_references_total", outcome="not_found") == not_found + 1
    assert page.locator(".message.error").count() == 0  # the page sent the image again by itself
    assert second == second_turn_by_client(gateway, media, first, "Where was it taken?")[0]
    assert page.evaluate("history[0].media") == [uuid]


def test_server_errors_are_shown_plainly(page, media):
    page.set_input_files("#file", str(media["image"]))
    page.select_option(".attachment select", "audio")
    ask(page, "What do you hear?")
    error = page.locator(".message.error")
    error.wait_for(timeout=ANSWER_TIMEOUT_MS)
    assert "415" in error.inner_text() and "holds an image" in error.inner_text()
    assert "param: audio" in error.inner_text()
    assert page.locator(".message.assistant").count() == 0  # no empty answer left behind

    ask(page, "How far is the wall?", media["depth"])  # a depth map needs an image beside it
    page.locator(".message.error").nth(1).wait_for(timeout=ANSWER_TIMEOUT_MS)
    assert "param: depth" in page.locator(".message.error").nth(1).inner_text()


def test_every_kind_of_file_is_recognised_and_summarised(page, media):
    page.set_input_files("#file", [str(media[kind]) for kind in
                                   ("image", "depth", "video", "audio", "point", "fmri", "imu")])
    kinds = page.locator(".attachment select").evaluate_all("selects => selects.map((s) => s.value)")
    assert kinds == ["image", "depth", "video", "audio", "point", "fmri", "imu"]
    assert page.locator(".attachment video").count() == 1 and page.locator(".attachment audio").count() == 1
    summaries = page.locator(".attachment .summary").all_inner_texts()
    assert any(s.startswith("cloud.npy · ") and " KB · " in s for s in summaries)
    assert any(s.startswith("walk_imu.csv · ") for s in summaries)

    page.click("summary")
    page.fill("#max-tokens", "3")
    page.fill("#prompt", "Describe all of these.")
    page.click("#send")
    assert wait_for_answer(page, 0).strip()


def test_image_with_normal_map(page, media):
    page.set_input_files("#file", [str(media["image"]), str(media["normal"])])
    assert page.locator(".attachment select").nth(1).input_value() == "normal"
    page.fill("#prompt", "Which way do the surfaces face?")
    page.click("#send")
    assert wait_for_answer(page, 0).strip()
