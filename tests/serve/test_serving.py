"""A live uvicorn server on 127.0.0.1, driven with the official `openai` client (and httpx for the admin API)."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import lorakit as lk
from lorakit.inference.generate import Row, Sampling, encode_chat, encode_prompt, generate_rows
from lorakit.serve.server import ServeConfig, build_engine

from conftest import tiny_llama
from live_server import running
from tiny_text import make_adapter, save_tiny_lm

TOKEN = "test-admin-token"
PROMPTS = ["the cat is red", "hello world", "a big dog walks to the old house", "what is the name of the pub",
           "two green birds sing at night", "the sun is hot"]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_tiny_lm(root / "base")
    for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
        model = make_adapter(tiny_llama(), name, seed)
        lk.save_adapter(model, root / "adapters" / name, adapter=name)
    (root / "secret").mkdir()
    config = ServeConfig(model=str(root / "base"), adapters_dir=str(root / "adapters"), adapters=["alpha", "beta"],
                         admin_token=TOKEN, batch_wait_ms=150, max_tokens_limit=32)
    engine = build_engine(config)
    server = running(engine)
    url = server.__enter__()

    # The reference: an independent copy of base + adapters, each prompt decoded alone.
    reference, tokenizer = lk.load_model(str(root / "base"))
    for name in ("alpha", "beta", "gamma"):
        lk.load_adapter(reference, root / "adapters" / name, adapter=name)

    def alone(ids, adapter, max_tokens=12):
        return generate_rows(reference, tokenizer, [Row(ids, adapter, Sampling(max_new_tokens=max_tokens))])[0].text

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield {"url": url, "client": client, "engine": engine, "tokenizer": tokenizer, "alone": alone}
    server.__exit__(None, None, None)


def test_models_lists_base_and_resident_adapters(live):
    ids = [m.id for m in live["client"].models.list().data]
    assert ids == ["base", "alpha", "beta"]


@pytest.mark.parametrize("model", ["alpha", "beta", "base"])
def test_completion_equals_the_adapter_alone(live, model):
    out = live["client"].completions.create(model=model, prompt=PROMPTS[5], max_tokens=12, temperature=0)
    expected = live["alone"](encode_prompt(live["tokenizer"], PROMPTS[5]), None if model == "base" else model)
    assert out.choices[0].text == expected and expected
    assert out.usage.prompt_tokens == len(encode_prompt(live["tokenizer"], PROMPTS[5]))


def test_adapters_give_different_answers(live):
    texts = {m: live["client"].completions.create(model=m, prompt=PROMPTS[5], max_tokens=12, temperature=0)
             .choices[0].text for m in ("alpha", "beta", "base")}
    assert len(set(texts.values())) == 3, texts


def test_chat_uses_the_chat_template(live):
    messages = [{"role": "user", "content": "hello what is the name of the cafe"}]
    out = live["client"].chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == live["alone"](encode_chat(live["tokenizer"], messages), "beta")


def test_streaming_completion_and_chat_match_non_streaming(live):
    client = live["client"]
    pieces, finish = [], None
    for chunk in client.completions.create(model="alpha", prompt=PROMPTS[5], max_tokens=12, temperature=0,
                                           stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    full = client.completions.create(model="alpha", prompt=PROMPTS[5], max_tokens=12, temperature=0)
    assert "".join(pieces) == full.choices[0].text and finish == full.choices[0].finish_reason
    assert len([p for p in pieces if p]) > 1  # really streamed, not one blob

    messages = [{"role": "user", "content": "the dog is big"}]
    stream = client.chat.completions.create(model="beta", messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == live["alone"](encode_chat(live["tokenizer"], messages), "beta") and text


def test_concurrent_requests_with_two_adapters_are_batched_and_match_alone(live):
    client, engine = live["client"], live["engine"]
    jobs = [(p, ("alpha", "beta")[i % 2]) for i, p in enumerate(PROMPTS)] * 2  # interleaved adapters
    before = dict(engine.stats)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(
            model=job[1], prompt=job[0], max_tokens=10, temperature=0).choices[0].text, jobs))
    for (prompt, adapter), answer in zip(jobs, answers):
        assert answer == live["alone"](encode_prompt(live["tokenizer"], prompt), adapter, 10), (prompt, adapter)
    assert engine.stats["mixed_adapter_steps"] > before["mixed_adapter_steps"]
    assert engine.stats["largest_batch"] > 1


def test_seeded_sampling_is_reproducible(live):
    ask = lambda: live["client"].completions.create(model="alpha", prompt=PROMPTS[3], max_tokens=12,  # noqa: E731
                                                    temperature=1.0, seed=5).choices[0].text
    assert ask() == ask()


def test_admin_needs_the_token_and_loads_and_unloads(live):
    url, client = live["url"], live["client"]
    assert httpx.post(url + "/admin/adapters", json={"name": "gamma"}).status_code == 401
    wrong = httpx.post(url + "/admin/adapters", json={"name": "gamma"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(url + "/admin/adapters", headers=auth).json() == {"loaded": ["alpha", "beta"],
                                                                        "available": ["alpha", "beta", "gamma"]}
    assert httpx.post(url + "/admin/adapters", json={"name": "gamma"}, headers=auth).status_code == 200
    out = client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == live["alone"](encode_prompt(live["tokenizer"], PROMPTS[0]), "gamma")
    assert httpx.post(url + "/admin/adapters", json={"name": "gamma"}, headers=auth).status_code == 409
    assert httpx.delete(url + "/admin/adapters/gamma").status_code == 401
    assert httpx.delete(url + "/admin/adapters/gamma", headers=auth).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gamma", prompt=PROMPTS[0], max_tokens=4)


@pytest.mark.parametrize("name", ["../secret", "..", "a/b", "/etc", "alpha/../../secret", ".hidden"])
def test_adapter_names_cannot_escape_the_adapters_dir(live, name):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(live["url"] + "/admin/adapters", json={"name": name}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter_name"
    with pytest.raises(openai.BadRequestError):
        live["client"].completions.create(model=name, prompt="hello", max_tokens=4)


def test_traversal_in_the_url_path_is_rejected(live):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.delete(live["url"] + "/admin/adapters/..%2Fsecret", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_adapter_is_404_with_openai_style_error(live):
    with pytest.raises(openai.NotFoundError) as info:
        live["client"].completions.create(model="nosuch", prompt="hello", max_tokens=4)
    assert info.value.body["code"] == "model_not_found"
    assert "alpha" in info.value.body["message"]  # says what exists


def test_prompt_too_long_is_400(live):
    with pytest.raises(openai.BadRequestError) as info:
        live["client"].completions.create(model="alpha", prompt="the cat " * 40, max_tokens=8)
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        live["client"].completions.create(model="alpha", prompt="the cat", max_tokens=500)


def test_bad_fields_are_422(live):
    client = live["client"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model="alpha", prompt="hello", temperature=7)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:  # a field this server does not know: 400 naming it
        client.completions.create(model="alpha", prompt="hello", extra_body={"unknown_field": 1})
    assert info.value.body["param"] == "unknown_field" and info.value.body["code"] == "unsupported_field"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "hi"}])
    r = httpx.post(live["url"] + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_adapter_loads_asked_over_http_run_on_the_engine_thread(live, monkeypatch):
    """One thread runs every model operator (a second OpenMP team slows every forward); admin loads and unloads are
    handed to the engine's thread."""
    import threading

    import lorakit.lora.adapter_io as adapter_io
    import lorakit.lora.injection as injection

    seen, load, delete = [], adapter_io.load_adapter, injection.delete_adapter
    monkeypatch.setattr(adapter_io, "load_adapter", lambda *a, **k: (seen.append(threading.get_ident()), load(*a, **k))[1])
    monkeypatch.setattr(injection, "delete_adapter", lambda *a, **k: (seen.append(threading.get_ident()),
                                                                      delete(*a, **k))[1])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.post(live["url"] + "/admin/adapters", json={"name": "gamma"}, headers=auth).status_code == 200
    assert httpx.delete(live["url"] + "/admin/adapters/gamma", headers=auth).status_code == 200
    engine = live["engine"]
    assert seen == [engine.owner, engine.owner] and engine.owner == engine.worker.ident != threading.get_ident()
