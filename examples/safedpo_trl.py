"""SafeDPO with TRL's DPOTrainer (pip install safedpo-kernels[trl]): same config, datasets and logs.

    python examples/safedpo_trl.py           # offline: fixture data, tiny random Llama
"""

from transformers import LlamaConfig, LlamaForCausalLM

from safedpo_kernels.data import load_fixture_tokenizer, load_pairs
from safedpo_kernels.integrations.trl import SafeDPOConfig, SafeDPOTrainer

tokenizer = load_fixture_tokenizer()
# TRL's prompt/chosen/rejected columns plus the unsafe flags chosen_unsafe/rejected_unsafe.
pairs, _ = load_pairs("fixture:pku_tiny", limit=16)

policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
config = SafeDPOConfig(output_dir="safedpo-trl-out", beta=0.1, delta=10.0, learning_rate=1e-4,
                       precompute_ref_log_probs=True,  # or pass ref_model=... for a live reference
                       max_length=128, per_device_train_batch_size=4, max_steps=4, logging_steps=1,
                       report_to="none", bf16=False)  # bf16=True (TRL's default) on a GPU
trainer = SafeDPOTrainer(policy, args=config, train_dataset=pairs, processing_class=tokenizer)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if "/" in k})  # TRL's names + safety extras
