# The w2a16 and w2a16-mixed variants of this lab, quantized and measured again on a CPU (2 cores, Python 3.11.7,
# torch 2.13.0+cpu, transformers 5.17.0), 2026-12-01, after the runtime fix for checkpoint zero points.
# Run from the repository root; the mixed recipe is the one the H200 lab's sensitivity pass wrote.
ptqlab quantize --recipe w2a16 --out /tmp/mixfull/w2a16 --quiet --overwrite
ptqlab quantize --recipe bench/results/autoround_smollm2/w2a16-mixed.yaml --out /tmp/mixfull/w2a16-mixed --quiet --overwrite
ptqlab bench /tmp/mixfull/w2a16 /tmp/mixfull/w2a16-mixed --out /tmp/mixfull/bench --ppl-full --runtime fast \
    --device cpu --max-new-tokens 8 --batch-sizes 1
