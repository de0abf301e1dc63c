"""scripts/web_demo.py in a real headless Chromium (Debian's, driven by playwright): a streamed reply."""

import json

import pytest
from tools_helpers import make_lora_dir, require, start_server, stop_server


@pytest.fixture(scope="module")
def web_url(tiny_model_dir, tmp_path_factory):
    require("fastapi", "the web demo is served by the API server (requirements-tools.txt)")
    lora = make_lora_dir(tiny_model_dir, tmp_path_factory.mktemp("web") / "adapter")
    proc, base_url = start_server("web_demo.py", lora)
    yield base_url
    stop_server(proc)


def test_send_message_and_see_streamed_reply(browser, web_url):
    page = browser.new_page()
    # Record every text the reply bubble is given: more than one distinct non-empty state means
    # streaming. Each `textContent =` adds a new text node, so the mutation records keep every state
    # even when several deltas arrive in one network read (then the observer runs once for all).
    page.goto(web_url + "/")
    page.evaluate("""() => {
        window.__states = [];
        new MutationObserver(records => {
            for (const r of records) {
                if (!(r.target.matches && r.target.matches('.message.assistant'))) continue;
                for (const n of r.addedNodes) {
                    if (n.nodeType === 3 && n.data && window.__states.at(-1) !== n.data) window.__states.push(n.data);
                }
            }
        }).observe(document.getElementById('log'), {subtree: true, childList: true});
    }""")
    assert "Baichuan2 chat" in page.title()
    page.fill("#max_tokens", "24")
    page.fill("#temperature", "0")
    page.fill("#input", "你好，请介绍一下北京。")
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=60_000)
    assert page.inner_text(".message.user") == "你好，请介绍一下北京。"
    reply = page.text_content(".message.assistant")
    assert reply
    states = page.evaluate("window.__states")
    assert len(states) > 1 and states[-1] == reply and reply.startswith(states[0])
    chunks = int(page.inner_text("#status").split("(")[1].split()[0])
    assert chunks > 1  # "done (N chunks)": the reply arrived as several SSE deltas

    # A second turn goes out with the history; "Clear" empties the conversation.
    page.fill("#input", "再说一遍")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll(\".message.assistant[data-done='true']\").length == 2",
                           timeout=60_000)
    assert page.locator(".message.user").count() == 2
    page.click("#clear")
    assert page.locator(".message").count() == 0
    page.close()


def test_defaults_come_from_the_generation_config_and_failed_turns_are_not_history(browser, web_url, tiny_model_dir):
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(str(tiny_model_dir))
    page = browser.new_page()
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(web_url + "/")
    assert float(page.input_value("#max_tokens")) == config.max_new_tokens
    assert float(page.input_value("#temperature")) == pytest.approx(config.temperature)
    assert float(page.input_value("#top_p")) == pytest.approx(config.top_p)
    assert float(page.input_value("#top_k")) == config.top_k
    assert float(page.input_value("#repetition_penalty")) == pytest.approx(config.repetition_penalty)
    assert page.is_hidden("#key_field")  # this server has no --api_key
    # A turn the server refuses (longer than the context): shown as an error, never sent again.
    page.fill("#max_tokens", "8")
    page.fill("#input", "长" * 3000)
    page.click("#send")
    page.wait_for_selector(".message.error[data-done='true']", timeout=60_000)
    assert "maximum context length" in page.inner_text(".message.error")
    page.fill("#input", "你好")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll(\".message[data-done='true']\").length == 2", timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "user", "content": "你好"}]
    assert sent[-1]["top_k"] == config.top_k and sent[-1]["max_tokens"] == 8
    # The successful turn is history for the next one.
    page.fill("#input", "再见")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll(\".message[data-done='true']\").length == 3", timeout=60_000)
    assert [m["content"] for m in sent[-1]["messages"]][::2] == ["你好", "再见"]
    page.close()


def test_error_event_inside_a_stream_is_shown_and_not_history(browser, web_url):
    """An OpenAI error event inside a 200 stream (e.g. a stuck or failed generation) is an error turn."""
    page = browser.new_page()
    sent = []

    def fake_stream(route):
        sent.append(json.loads(route.request.post_data))
        if len(sent) == 1:
            body = ('data: {"choices": [{"index": 0, "delta": {"content": "部分"}}]}\n\n'
                    'data: {"error": {"message": "generation failed: boom", "type": "server_error"}}\n\n')
            route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
        else:
            route.continue_()

    page.route("**/v1/chat/completions", fake_stream)
    page.goto(web_url + "/")
    page.fill("#max_tokens", "4")
    page.fill("#input", "第一句")
    page.click("#send")
    page.wait_for_selector(".message.error[data-done='true']", timeout=60_000)
    assert "generation failed: boom" in page.inner_text(".message.error")
    page.fill("#input", "第二句")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll(\".message[data-done='true']\").length == 2", timeout=60_000)
    assert sent[-1]["messages"] == [{"role": "user", "content": "第二句"}]
    page.close()


def test_system_prompt_field_heads_every_request(browser, web_url):
    """The page's system prompt goes out as the first message of each turn (history stays user/assistant
    turns), and the reply shown is the server's reply to exactly that conversation."""
    import urllib.request

    system = "你是一个只用中文回答的助手。"
    page = browser.new_page()
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(web_url + "/")
    page.fill("#max_tokens", "12")
    page.fill("#temperature", "0")
    page.fill("#system", system)
    page.fill("#input", "你好")
    page.click("#send")
    page.wait_for_selector(".message.assistant[data-done='true']", timeout=60_000)
    shown = page.text_content(".message.assistant")
    assert sent[-1]["messages"] == [{"role": "system", "content": system}, {"role": "user", "content": "你好"}]

    def server_reply(messages):
        body = dict(sent[-1], messages=messages, stream=False)
        request = urllib.request.Request(web_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]

    assert shown == server_reply(sent[-1]["messages"])
    assert shown != server_reply(sent[-1]["messages"][1:])  # the system prompt changed the reply
    page.fill("#input", "再见")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll(\".message.assistant[data-done='true']\").length == 2",
                           timeout=60_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["system", "user", "assistant", "user"]
    page.fill("#system", "")  # cleared: no system message at all
    page.fill("#input", "谢谢")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll(\".message.assistant[data-done='true']\").length == 3",
                           timeout=60_000)
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    page.close()
