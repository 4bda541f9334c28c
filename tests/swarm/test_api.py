"""`beectl api` driven by the real `openai` client, over a real 2-server swarm."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import peers_of
from tests.swarm.test_faults import server_info

MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "Name three colours."}]


def start_api(swarm, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "beectl.cli",
            "api",
            "--port",
            "0",
            "--initial-peers",
            ",".join(peers_of(swarm)),
            *extra,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready http://"), line
    return proc, line.split()[1]


@pytest.fixture(scope="module")
def api(swarm2) -> Iterator[str]:
    proc, url = start_api(swarm2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=120)


def local_answer(local_model, tokenizer, messages, max_tokens: int) -> str:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    out = local_model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_chat_greedy_equals_local_transformers_and_streams_the_same_text(
    client, local_model, tokenizer
):
    answer = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    text = answer.choices[0].message.content
    assert text == local_answer(local_model, tokenizer, QUESTION, 24)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 24 and answer.usage.prompt_tokens > 5
    parts, usage, finish = [], None, None
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == text and finish == "length"
    assert usage is not None and usage.total_tokens == answer.usage.total_tokens
    # beed's extension: speculation forced on (up to 6 drafts a round, or trees of 3
    # branches 4 deep) answers the same.
    for speculate in (6, "4x3"):
        drafted = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            extra_body={"speculate": speculate},
        )
        assert drafted.choices[0].message.content == text


def test_models_completions_stop_and_n(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    full = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16
    )
    text = full.choices[0].text
    word = text.split()[3]
    cut = client.completions.create(
        model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=16, stop=[word]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(word)]
    two = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=8, n=2
    )
    assert (
        len(two.choices) == 2 and two.choices[0].message.content == two.choices[1].message.content
    )


def test_bad_requests_get_openai_errors(client, api):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model=MODEL, messages=[])
    assert empty.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)
    with pytest.raises(openai.BadRequestError) as speculate:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, extra_body={"speculate": "fast"}
        )
    assert speculate.value.body["param"] == "speculate"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=10**6)
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{api}/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as broken:
        urllib.request.urlopen(request, timeout=30)
    assert broken.value.code == 400 and b"not valid JSON" in broken.value.read()


def test_a_client_that_leaves_mid_stream_leaves_no_session(client, swarm2):
    def sessions() -> list[int]:
        return [server_info(s.address)["sessions"] for s in swarm2.servers]

    idle = sessions()  # sessions the API keeps between requests (prefix reuse)
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=200, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert sessions() == [n + 1 for n in idle]
    stream.close()
    deadline = time.monotonic() + 10
    while sessions() != idle:
        assert time.monotonic() < deadline, "the servers still hold the dropped request's session"
        time.sleep(0.2)


def test_eight_concurrent_streams_all_get_their_answer(client):
    expected = (
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=12)
        .choices[0]
        .message.content
    )
    results: list[str] = [""] * 8
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            parts = []
            for chunk in client.chat.completions.create(
                model=MODEL, messages=QUESTION, temperature=0, max_tokens=12, stream=True
            ):
                parts += [c.delta.content or "" for c in chunk.choices]
            results[i] = "".join(parts)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and results == [expected] * 8


def test_an_api_key_is_required_when_set(swarm2):
    proc, url = start_api(swarm2, "--api-key", "sesame")
    try:
        anonymous = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == [MODEL]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_metrics_parse_and_count_the_requests(client, api):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    text = urllib.request.urlopen(f"{api}/metrics", timeout=30).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = ("beectl_api_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    assert samples[ok] >= 1
    assert samples[("beectl_api_completion_tokens_total", ())] >= 4
    assert samples[("beectl_api_head_products_total", ())] >= 4
    assert samples[("beectl_api_first_token_seconds_count", ())] >= 1


def test_the_next_turn_of_a_conversation_reuses_the_cached_prefix(client, local_model, tokenizer):
    messages = [{"role": "user", "content": "My name is Alice and I live in Paris."}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "What city do I live in?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16
    )
    # The servers held the first turn (its prompt and answer): only the new turn was sent.
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens
    assert second.choices[0].message.content == local_answer(local_model, tokenizer, messages, 16)
