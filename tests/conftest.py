"""Tiny in-process models (never downloaded) shared by the whole suite."""

from __future__ import annotations

import os

import pytest
import torch

# Respect OMP_NUM_THREADS when set (a shared, loaded machine); otherwise use up to 2 threads.
if not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(seed: int = 0, hidden_size: int = 32, intermediate_size: int = 48):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def quantizable_llama(seed: int = 0):
    """The tiny Llama at widths real quantization kernels accept: every base linear's input width a multiple of
    bitsandbytes' NF4 block (64) and every output width a multiple of 32 (its AVX512-BF16 CPU kernel's row block)."""
    return tiny_llama(seed, hidden_size=64, intermediate_size=128)


def single_threaded():
    """Run a test on one thread: on tiny matrices two threads on a shared machine spend more time synchronising than
    computing. Test modules make it a fixture: `one_thread = pytest.fixture(autouse=True, name="one_thread")(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def model_output(model, ids):
    out = model(input_ids=ids)
    return out.logits


@pytest.fixture
def ids():
    torch.manual_seed(123)
    return torch.randint(1, 97, (3, 9))


def randomize_lora_B(model, adapter: str = "default", std: float = 0.5, seed: int = 7):
    """Make B (and embedding A) non-zero so the adapter changes outputs."""
    from lorakit.lora.injection import lora_layers
    from lorakit.lora.layers import LoraEmbedding, LoraLinear

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if adapter not in layer.adapters:
                continue
            if isinstance(layer, LoraLinear):
                w = layer.lora_B[adapter].weight
                w.copy_(torch.randn(w.shape, generator=gen) * std)
            elif isinstance(layer, LoraEmbedding):
                a = layer.lora_embedding_A[adapter]
                a.copy_(torch.randn(a.shape, generator=gen) * std)
            else:
                for p in layer.modules_to_save[adapter].parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * std)
