"""1,000 adapter folders on disk served through an adapter cache that holds 32: every answer right, no 5xx."""

from __future__ import annotations

import os
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import lorakit as lk
from conftest import randomize_lora_B, tiny_llama
from live_server import running
from lorakit.inference.generate import Row, Sampling, encode_prompt, generate_rows
from lorakit.lora.adapter_io import WEIGHTS_FILE
from lorakit.serve.server import ServeConfig, build_engine
from tiny_text import save_tiny_lm, tiny_tokenizer

PROMPT = "the cat is red and the dog"


@pytest.mark.stress
def test_a_thousand_adapters_through_a_cache_of_32(tmp_path):
    count = int(os.environ.get("LORAKIT_MANY_ADAPTERS", "1000"))
    save_tiny_lm(tmp_path / "base")
    model, tok = tiny_llama(), tiny_tokenizer()
    model.generation_config.eos_token_id = 2
    ids = encode_prompt(tok, PROMPT)
    expected = {}
    for i in range(count):  # each adapter's answer alone, computed as it is made
        name = f"ad{i:04d}"
        lk.add_lora(model, lk.LoraConfig(r=4, alpha=8), adapter=name)
        randomize_lora_B(model, name, std=0.5, seed=i)
        lk.save_adapter(model, tmp_path / "adapters" / name, adapter=name)
        expected[name] = generate_rows(model, tok, [Row(ids, name, Sampling(max_new_tokens=6))])[0].text
        lk.delete_adapter(model, name)
    assert len(set(expected.values())) > count // 4  # the adapters really answer differently
    adapter_bytes = 896 * 4  # r=4 on q (32x32) and v (16x32) in 2 layers, fp32
    file_bytes = (tmp_path / "adapters" / "ad0000" / WEIGHTS_FILE).stat().st_size
    cache_mb = (31 * adapter_bytes + file_bytes + 100) / 1e6  # 32 resident adapters at most
    engine = build_engine(ServeConfig(model=str(tmp_path / "base"), adapters_dir=str(tmp_path / "adapters"),
                                      adapters=[], max_adapter_mb=cache_mb, max_batch_size=8))
    order = list(expected) + random.Random(0).choices(list(expected), k=count // 2)  # each once, then repeats
    random.Random(1).shuffle(order)
    with running(engine) as url, httpx.Client(base_url=url, timeout=120) as http:
        def ask(name: str) -> tuple[str, int, str]:
            r = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 6,
                                                   "temperature": 0})
            return name, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, order))
        statuses = {}
        for _, status, _ in answers:
            statuses[status] = statuses.get(status, 0) + 1
        wrong = [(n, t) for n, s, t in answers if s == 200 and t != expected[n]]
        assert statuses == {200: len(order)} and not wrong, (statuses, wrong[:3])
        assert len(engine.loaded()) <= 32 and sum(engine.adapters.sizes.values()) <= cache_mb * 1e6
        assert engine.metrics.value("lorakit_adapter_cache_evictions_total") >= count - 32
