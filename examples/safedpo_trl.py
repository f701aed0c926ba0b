"""SafeDPO with TRL (pip install "safedpo-kernels[trl]"): a plain DPOConfig and a LoRA peft_config.

    python examples/safedpo_trl.py           # offline: fixture data, tiny random Llama
"""

from peft import LoraConfig
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig

from safedpo_kernels.data import load_fixture_tokenizer, load_pairs
from safedpo_kernels.integrations import SafeDPOTrainer

tokenizer = load_fixture_tokenizer()
# TRL's prompt/chosen/rejected columns plus the unsafe flags chosen_unsafe/rejected_unsafe.
pairs, _ = load_pairs("fixture:pku_tiny", limit=16)

policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
config = DPOConfig(output_dir="safedpo-trl-out", beta=0.1, learning_rate=1e-3, max_length=128,
                   per_device_train_batch_size=4, max_steps=4, logging_steps=1, report_to="none",
                   bf16=False)  # bf16=True (TRL's default) on a GPU
lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
# Reference = the policy with the adapter disabled (no second model); delta is the safety margin.
trainer = SafeDPOTrainer(policy, args=config, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=lora, delta=10.0)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if "/" in k})  # TRL's names + safety extras
