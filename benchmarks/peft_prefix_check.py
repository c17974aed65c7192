"""Does lorakit's training loss drive a PEFT prefix-tuning model? (issue 21: the E2E prefix-tuning baseline)

Until 2026-12-01 it did not: lorakit.train.losses.causal_lm_loss unwrapped every PEFT model (get_base_model()) and ran
the transformers model itself, so PeftModelForCausalLM.forward, which is where prompt-learning methods (prefix,
prompt, p-tuning) put their virtual tokens into past_key_values, never ran: the loss was the base model's (4.594495
against PEFT's 4.593654 here) and nothing that trains was in its graph. Now a prompt-learning model's loss comes from
PEFT's own forward (tests/train/test_losses.py checks it). This script shows it on the tests' tiny Llama in seconds:

    .venv/bin/python benchmarks/peft_prefix_check.py
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent / "tests"), str(ROOT)]
torch.set_num_threads(1)

from conftest import tiny_llama  # noqa: E402
from lorakit.train.losses import batch_loss  # noqa: E402
from peft import PrefixTuningConfig, get_peft_model  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = torch.randint(1, 97, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        with_prefix = float(model(**batch).loss)
        lorakit_loss = batch_loss(model, batch, "causal-lm")
        with model.disable_adapter():
            base = float(model(**batch).loss)
    print(f"PEFT's forward (with the prefix): {with_prefix:.6f}")
    print(f"lorakit's batch_loss:             {float(lorakit_loss):.6f}")
    print(f"the base model without prefix:    {base:.6f}")
    loss = batch_loss(model, batch, "causal-lm")
    where = "in" if loss.requires_grad else "NOT in"
    print(f"lorakit's loss requires grad: {loss.requires_grad} (the prefix encoder is {where} its graph)")


if __name__ == "__main__":
    main()
