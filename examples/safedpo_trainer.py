"""SafeDPO with transformers.Trainer (SafeDPOHFTrainer), reference log-probs precomputed once.

    python examples/safedpo_trainer.py       # offline: fixture data, tiny random Llama
"""

import copy

from transformers import LlamaConfig, LlamaForCausalLM

from safedpo_kernels.data import PaddedPairCollator, load_fixture_tokenizer, load_pairs, tokenize_pairs
from safedpo_kernels.integrations import SafeDPOHFConfig, SafeDPOHFTrainer, add_reference_logps

tokenizer = load_fixture_tokenizer()
pairs, _ = load_pairs("fixture:pku_tiny", limit=16)
data, _ = tokenize_pairs(pairs, tokenizer, max_length=128)  # safe-rlhf template (or the chat template)

policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
reference = copy.deepcopy(policy).requires_grad_(False)
# One no-grad pass adds ref_chosen_logps / ref_rejected_logps; the reference can then be freed.
# (Or skip this and pass ref_model=reference to the trainer; a PEFT policy needs neither.)
data = add_reference_logps(data, reference, PaddedPairCollator(tokenizer.pad_token_id), batch_size=8)
del reference

config = SafeDPOHFConfig(output_dir="safedpo-trainer-out", beta=0.1, delta=10.0, learning_rate=1e-4,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2,  # exact: mean over kept pairs
                         max_steps=4, logging_steps=1, report_to="none")
trainer = SafeDPOHFTrainer(policy, config, train_dataset=data, processing_class=tokenizer)
trainer.train()
print({k: v for k, v in trainer.state.log_history[-2].items() if "/" in k})  # rewards/*, logps/*, safety, pairs
