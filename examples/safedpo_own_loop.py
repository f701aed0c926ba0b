"""SafeDPO in your own PyTorch loop: hidden states + output head -> fused loss, no logits.

    python examples/safedpo_own_loop.py      # offline: fixture data, tiny random Llama
For real training use AutoModelForCausalLM / AutoTokenizer.from_pretrained(...) and
load_pairs("PKU-Alignment/PKU-SafeRLHF-30K").
"""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safedpo_kernels import FusedLinearSafeDPOLoss
from safedpo_kernels.data import PaddedPairCollator, load_fixture_tokenizer, load_pairs, tokenize_pairs
from safedpo_kernels.integrations import hidden_states_and_head_weight, output_head, reference_sequence_logps

tokenizer = load_fixture_tokenizer()
pairs, _ = load_pairs("fixture:pku_tiny", limit=16)  # prompt, chosen, rejected, chosen_unsafe, rejected_unsafe
data, _ = tokenize_pairs(pairs, tokenizer, max_length=128)
loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                     collate_fn=PaddedPairCollator(tokenizer.pad_token_id))

policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
reference = copy.deepcopy(policy).requires_grad_(False).eval()
# The head's logit transform (Gemma 2 soft-capping, Cohere / Granite scaling; 1.0 / None for Llama):
# never pass a raw lm_head.weight without it, the loss would be wrong for those models.
head = output_head(policy)
loss_fn = FusedLinearSafeDPOLoss(beta=0.1, delta=10.0, logit_scale=head.logit_scale, softcap=head.softcap)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)

for step, batch in enumerate(loader):  # input_ids/attention_mask/labels (2B, T): B chosen rows, then B rejected
    ref_chosen, ref_rejected = reference_sequence_logps(reference, batch)  # or precomputed columns in the batch
    out = hidden_states_and_head_weight(policy, batch["input_ids"], batch["attention_mask"])
    loss, _, metrics = loss_fn(out.weight, out.hidden[:, :-1], batch["labels"][:, 1:], out.bias,  # t predicts t + 1
                               chosen_unsafe=batch["chosen_unsafe"], rejected_unsafe=batch["rejected_unsafe"],
                               ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, return_metrics=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(step, {name: round(value.item(), 4) for name, value in metrics.items()})
