"""How the decoding of tiny_compare_long.yaml was chosen (run from the repo root, after the lr-selection run
that trained the shared SFT model into recipes/outputs/lrsel_1e-4/seed0/sft):

    python recipes/results/decoding_selection/select_decoding.py   # -> sft_validation.json

Samples the SFT model on the VALIDATION prompts at each (temperature, top-p) of the grid and judges the
samples with judge_long; the rule (docs/compare.md): the highest temperature at which >= 90 % are fluent.
"""
import json, sys, time
sys.path.insert(0, ".")
from pathlib import Path
import torch
torch.set_num_threads(1)
from recipes import compare_methods as cm
cfg = cm.load_config("recipes/configs/tiny_compare_long.yaml", overrides={"seeds": [0], "recipe": {"eval_split": "validation"}})
st = cm.build_stage_configs(cfg, seed=0, stage_root=Path("x"), sft_dir=Path("recipes/outputs/lrsel_1e-4/seed0/sft"), sft_seed=0)[0]
rc = cm.validate_recipe_config(st.config)
tok = cm.load_tokenizer(rc); data = cm.load_eval_data(rc, tok)
model = cm.load_model("recipes/outputs/lrsel_1e-4/seed0/sft/hf_export")
judge = cm.judge_for(data.source)
out = {}
for temp, top_p in [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9), (0.5, 0.9)]:
    ev = dict(cfg["evaluation"], temperature=temp, top_p=top_p)
    t = time.time()
    m, recs = cm.generate_and_judge(model, tok, data, ev, seed=10_000, judge=judge)
    m["gen/sft_nll"] = cm.response_nll(model, recs, tok.pad_token_id, 256)
    out[f"T={temp},top_p={top_p}"] = {k: m[k] for k in ("gen/fluent", "gen/harmless_ratio_harmful", "gen/over_refusal_benign", "gen/over_refusal_sensitive", "gen/helpfulness", "gen/sft_nll", "gen/degenerate_unknown_words", "gen/degenerate_repetitive")}
    print(temp, top_p, json.dumps(out[f"T={temp},top_p={top_p}"]), f"{time.time()-t:.0f}s", flush=True)
Path("recipes/results/decoding_selection/sft_validation.json").write_text(json.dumps(out, indent=1) + "\n")
