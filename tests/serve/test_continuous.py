"""The continuous scheduler: rows join and leave between steps and still answer exactly as alone (every adapter kind
the server loads), admission control, the OpenAI fields real clients send, and /metrics."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from lorakit.inference.generate import Row, Sampling, encode_chat, encode_prompt, generate_rows
from lorakit.serve.scheduler import Scheduler, Seq
from lorakit.serve.server import ServeConfig, build_engine
from live_server import running
from tiny_text import save_tiny_lm

PROMPTS = ["the cat is red", "hello world", "a big dog walks to the old house near the river and the tree",
           "what is the name of the pub", "two green birds sing at night", "the sun is hot",
           "one two three four five six seven eight nine ten", "where is the cafe"]
KINDS = {  # adapter name -> LoraConfig: every kind of adapter the server loads (PiSSA/OLoRA replace the base by a
           # residual, so they cannot share a base with other adapters and are served alone)
    "lora": dict(r=4, alpha=8),
    "dora": dict(r=4, alpha=8, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "rslora": dict(r=8, alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                   rank_pattern={"down_proj": 2}),
    "gauss": dict(r=4, alpha=8, init="gaussian", target_modules=["q_proj", "v_proj", "gate_proj"],
                  alpha_pattern={"gate_proj": 2.0}),
    "embed": dict(r=4, alpha=8, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("continuous")
    save_tiny_lm(root / "base")
    for seed, (name, kind) in enumerate(KINDS.items(), 1):
        model = tiny_llama()
        lk.add_lora(model, lk.LoraConfig(**kind), adapter=name)
        randomize_lora_B(model, name, std=0.5, seed=seed)
        lk.save_adapter(model, root / "adapters" / name, adapter=name)
    config = ServeConfig(model=str(root / "base"), adapters_dir=str(root / "adapters"), max_batch_size=3,
                         max_step_tokens=3 + 8, prefill_chunk=8, max_tokens_limit=24)
    engine = build_engine(config)
    server = running(engine)
    url = server.__enter__()
    reference, tokenizer = lk.load_model(str(root / "base"))
    for name in KINDS:
        lk.load_adapter(reference, root / "adapters" / name, adapter=name)

    def alone(ids, adapter, max_tokens, **sampling):
        return generate_rows(reference, tokenizer, [Row(ids, adapter, Sampling(max_new_tokens=max_tokens,
                                                                               **sampling))])[0]

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield {"url": url, "client": client, "engine": engine, "tokenizer": tokenizer, "alone": alone,
           "reference": reference, "root": root}
    server.__exit__(None, None, None)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_rows_joining_and_leaving_answer_exactly_as_alone_for_every_adapter_kind(live):
    """24 requests on 3 slots: rows of different lengths (prompts of 4..15 tokens prefilled in chunks of 8, 3..24 new
    tokens) leave at different steps and waiting ones take their slots; every answer equals the request alone."""
    client, engine, tok = live["client"], live["engine"], live["tokenizer"]
    names = list(KINDS) + ["base"]
    jobs = [(PROMPTS[i % len(PROMPTS)], names[i % len(names)], 3 + (7 * i) % 22) for i in range(24)]
    before = dict(engine.stats)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: client.completions.create(
            model=job[1], prompt=job[0], max_tokens=job[2], temperature=0, extra_body={"ignore_eos": True}), jobs))
    for (prompt, name, max_tokens), answer in zip(jobs, answers):
        expected = live["alone"](encode_prompt(tok, prompt), None if name == "base" else name, max_tokens,
                                 ignore_eos=True)
        assert answer.choices[0].text == expected.text, (prompt, name, max_tokens)
        assert answer.usage.completion_tokens == len(expected.token_ids) == max_tokens
        assert answer.usage.prompt_tokens == len(encode_prompt(tok, prompt))
    assert engine.stats["largest_batch"] == 3  # all slots were used ...
    assert engine.stats["mixed_adapter_steps"] > before["mixed_adapter_steps"]  # ... by different adapters at once
    # fewer steps than tokens: rows shared steps (a step decodes every running row)
    assert engine.stats["steps"] - before["steps"] < sum(j[2] for j in jobs)
    # the adapters really differ, so the equality above can fail
    texts = {n: live["alone"](encode_prompt(tok, PROMPTS[0]), None if n == "base" else n, 8).token_ids for n in names}
    assert len({tuple(t) for t in texts.values()}) == len(names), texts


def test_scheduler_admits_in_order_and_compacts_slots_when_rows_leave():
    sched = Scheduler(slots=2, max_step_tokens=2 + 4, prefill_chunk=4, max_row_tokens=20)
    seqs = [Seq([1] * n, None, Sampling(max_new_tokens=5), None, i, None, arrival=float(i))
            for i, n in enumerate((6, 3, 2))]
    for s in seqs:
        sched.add(s)
    step = sched.schedule()  # two slots: rows 0 and 1 admitted, row 2 waits; 4 + 3 tokens > budget 6: one chunk
    assert [s.slot for s in seqs] == [0, 1, None] and [(c[0].index, c[1], c[2]) for c in step.chunks] == [(0, 0, 4)]
    seqs[0].computed = 4
    step = sched.schedule()
    assert [(c[0].index, c[1], c[2]) for c in step.chunks] == [(0, 4, 2), (1, 0, 3)] and step.tokens == 5
    seqs[0].computed, seqs[1].computed = 6, 3
    seqs[0].output, seqs[1].output = [7], [7, 8]
    sched.leave(seqs[0])  # slot 0 frees; row 1 (slot 1, 3 + 1 cached) moves down; row 2 joins in slot 1
    step = sched.schedule()
    assert step.moves == [(1, 0, seqs[1])] and seqs[1].cached == 4 and [s.slot for s in seqs] == [None, 0, 1]
    assert [s.index for s in step.decode] == [1] and [(c[0].index, c[2]) for c in step.chunks] == [(2, 2)]
    assert sched.refusal(15, 5) is None and "at most 20 tokens" in sched.refusal(16, 5)


def test_a_request_that_can_never_fit_is_400_and_one_that_must_wait_waits(live, tmp_path):
    root = live["root"]
    engine = build_engine(ServeConfig(model=str(root / "base"), adapters_dir=str(root / "adapters"), adapters=[],
                                      max_batch_size=2, max_step_tokens=2 + 16, prefill_chunk=16,
                                      kv_cache_mb=2 * 20 * engine_bytes_per_token(live) / 1e6))
    with running(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as info:  # 5 + 16 tokens > 20 per KV slot
            client.completions.create(model="base", prompt="the cat is red", max_tokens=16)
        assert info.value.body["code"] == "context_length_exceeded" and "at most 20" in info.value.body["message"]
        # 10 requests for 2 slots: each waits its turn, none fails
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda p: client.completions.create(model="base", prompt=p, max_tokens=6,
                                                                        temperature=0), PROMPTS[:2] * 5))
        tok = live["tokenizer"]
        assert [a.choices[0].text for a in answers] == [live["alone"](encode_prompt(tok, p), None, 6).text
                                                        for p in PROMPTS[:2] * 5]
        assert engine.stats["largest_batch"] == 2


def engine_bytes_per_token(live) -> int:
    return live["engine"].runner.bytes_per_token


def reference_greedy(model, ids, steps, adapter, penalty=(0.0, 0.0), bias=None):
    """Greedy decoding by hand: full forward each step, OpenAI's penalties over the generated tokens."""
    out, logps = [], []
    for _ in range(steps):
        with torch.no_grad(), lk.adapters_per_row(model, [adapter]):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
        for t in set(out):
            logits[t] -= out.count(t) * penalty[0] + penalty[1]
        for t, b in (bias or {}).items():
            logits[t] += b
        out.append(int(logits.argmax()))
        logps.append(torch.log_softmax(logits, -1))
    return out, logps


def test_penalties_logprobs_and_logit_bias_match_a_hand_computation(live):
    client, tok, reference = live["client"], live["tokenizer"], live["reference"]
    ids = encode_prompt(tok, PROMPTS[3])
    plain, _ = reference_greedy(reference, ids, 12, "lora")
    hand, logps = reference_greedy(reference, ids, 12, "lora", penalty=(1.5, 0.5), bias={7: 3.0})
    out = client.completions.create(model="lora", prompt=PROMPTS[3], max_tokens=12, temperature=0, logprobs=3,
                                    frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"7": 3.0},
                                    extra_body={"ignore_eos": True})
    assert hand != plain  # the penalties changed the answer, so the check means something
    assert out.choices[0].text == tok.decode(hand, skip_special_tokens=True)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 12
    for got, token, logp, top in zip(lp.token_logprobs, hand, logps, lp.top_logprobs):
        assert got == pytest.approx(float(logp[token]), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == pytest.approx(got, abs=1e-6)  # greedy: the top token
    chat = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "the dog"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    for c in content:  # greedy: the chosen token is the most likely one
        assert c.logprob <= 0 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) and c.token == c.top_logprobs[0].token


def test_fields_real_clients_send(live):
    client, tok = live["client"], live["tokenizer"]
    forced_end = {"2": 100.0}  # token 2 is the end token: the answer ends at once ...
    ended = client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=6, logit_bias=forced_end)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 0
    kept = client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=6, logit_bias=forced_end,
                                     extra_body={"ignore_eos": True})  # ... unless ignore_eos
    assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 6
    least = client.completions.create(model="lora", prompt=PROMPTS[0], max_tokens=6, logit_bias=forced_end,
                                      extra_body={"min_tokens": 4})
    assert least.usage.completion_tokens == 4 and least.choices[0].finish_reason == "stop"
    many = client.completions.create(model="dora", prompt=[PROMPTS[0]], n=3, max_tokens=8, temperature=1.0,
                                     seed=3, top_p=0.9, user="u1")
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text != many.choices[1].text  # seed + choice index: two different samples
    again = client.completions.create(model="dora", prompt=PROMPTS[0], n=2, max_tokens=8, temperature=1.0, seed=3,
                                      top_p=0.9)
    assert [c.text for c in again.choices] == [c.text for c in many.choices[:2]]
    ids = encode_prompt(tok, PROMPTS[2])
    by_ids = client.completions.create(model="gauss", prompt=ids, max_tokens=8, temperature=0, echo=True)
    assert by_ids.choices[0].text == tok.decode(ids) + live["alone"](ids, "gauss", 8).text
    messages = [{"role": "developer", "content": "be short"},
                {"role": "user", "content": [{"type": "text", "text": "the dog is big"}]}]
    chat = client.chat.completions.create(model="embed", messages=messages, max_completion_tokens=8, temperature=0,
                                          frequency_penalty=0, presence_penalty=0, response_format={"type": "text"},
                                          stream_options=None, parallel_tool_calls=None, n=1)
    rendered = encode_chat(tok, [{"role": "system", "content": "be short"}, {"role": "user", "content": "the dog is big"}])
    assert chat.choices[0].message.content == live["alone"](rendered, "embed", 8).text
    stream = client.chat.completions.create(model="embed", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens == len(rendered)


@pytest.mark.parametrize("field, value", [("response_format", {"type": "json_object"}),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("reasoning_effort", "high"), ("unknown_field", 1)])
def test_unsupported_fields_are_400_naming_the_field(live, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        live["client"].chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, extra_body={field: value})
    assert info.value.body["param"] == field and info.value.body["code"] == "unsupported_field"
    assert field in info.value.body["message"]


def test_metrics_count_requests_tokens_and_latencies(live):
    url, client = live["url"], live["client"]
    names = ("lorakit_requests_total{outcome=\"ok\"}", "lorakit_generation_tokens_total",
             "lorakit_time_to_first_token_seconds_count", "lorakit_time_per_output_token_seconds_count")
    before = {n: metric(url, n) for n in names}
    outs = [client.completions.create(model=m, prompt=PROMPTS[1], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True}) for m in ("lora", "base", "dora")]
    after = {n: metric(url, n) for n in names}
    tokens = sum(o.usage.completion_tokens for o in outs)
    assert after[names[0]] - before[names[0]] == 3
    assert after[names[1]] - before[names[1]] == tokens == 15
    assert after[names[2]] - before[names[2]] == 3  # one first token per request
    assert after[names[3]] - before[names[3]] == tokens - 3  # one gap per later token
    text = httpx.get(url + "/metrics").text
    for series in ("lorakit_requests_waiting", "lorakit_requests_running", "lorakit_batch_occupancy_ratio",
                   "lorakit_adapter_cache_hits_total", "lorakit_adapter_cache_evictions_total",
                   "lorakit_kv_cache_bytes", 'lorakit_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert re.search(rf"^{re.escape(series)} \d", text, re.M), series
    assert "# TYPE lorakit_time_per_output_token_seconds histogram" in text


def test_static_scheduler_is_still_available_and_answers_the_same(live):
    root = live["root"]
    engine = build_engine(ServeConfig(model=str(root / "base"), adapters_dir=str(root / "adapters"),
                                      adapters=["dora"], scheduler="static", batch_wait_ms=50))
    with running(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: client.completions.create(model="dora", prompt=p, max_tokens=8,
                                                                        temperature=0).choices[0].text, PROMPTS[:4]))
        tok = live["tokenizer"]
        assert answers == [live["alone"](encode_prompt(tok, p), "dora", 8).text for p in PROMPTS[:4]]
        assert engine.stats["largest_batch"] > 1 and metric(url, "lorakit_generation_tokens_total") > 0
