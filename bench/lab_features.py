"""The lab's features end to end on a GPU: a Qwen2.5-0.5B-shaped random model (bf16, the tests' tiny tokenizer), the
new formats, sensitivity with its mixed variant, the decode sweep at batch 1, 8 and 32, the report.

    OUT=bench/results/lab_features_h200 python3 bench/lab_features.py

Random weights: the figures check that every path runs and that prediction and measurement agree, not quality.
"""
import json, os, subprocess, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "tests")
from tiny import CHATS, save_tiny_model, write_jsonl

out = Path(os.environ["OUT"])
work = Path("/tmp/gpulab")
work.mkdir(exist_ok=True)
model = save_tiny_model(work / "model", "qwen2", torch.bfloat16, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                        max_position_embeddings=4096)
chats = write_jsonl(work / "chats.jsonl", CHATS * 4)
text = work / "text.txt"
text.write_text(open("tests/tiny.py").read() * 30)
start = time.time()
cmd = [sys.executable, "-m", "ptqlab", "lab", str(model), "--recipes", "fp8-dynamic,w4a16,fp8-block,w4a8",
       "--sensitivity", "--target-kl", "0.002", "--out", str(out / "lab"), "--dataset", str(chats), "--num-samples", "64",
       "--max-seq-len", "256", "--ppl-text", str(text), "--ppl-context", "256", "--batch-sizes", "1,8,32",
       "--max-new-tokens", "64"]
proc = subprocess.run(cmd, capture_output=True, text=True)
print(proc.stdout[-6000:]); print(proc.stderr[-4000:])
print("rc", proc.returncode, "seconds", round(time.time() - start, 1))
import shutil
for name in ("summary.md", "results.json", "report.html", "sensitivity.json"):
    if (out / "lab" / name).is_file():
        shutil.copy(out / "lab" / name, out / name)
shutil.rmtree(out / "lab", ignore_errors=True)
