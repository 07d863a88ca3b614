"""Generation speed: time to first token, batch-1 decode tokens/s, batched throughput, decode tok/s over a sweep of
batch sizes; and sample answers.

Both runtimes are measured by the same code through an engine with `timed(ids, n)` and `complete(...)`: the
ordinary transformers path, and ptqlab's fast runtime.

Every measurement runs greedy decoding for a fixed number of new tokens with EOS ignored, so every variant
does the same work. Each is warmed up first (kernels, allocator, lazy init stay out of the numbers), then
repeated; we report the median and keep the raw repeats. The device is synchronised at each timestamp.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ptqlab.models import model_device, synchronizer

WARMUP_TOKENS = 16
SPEED_PROMPT = "Explain in a few sentences what quantization does to a neural network and why it makes inference faster."
SAMPLE_PROMPTS = [
    "What is the capital of France?",
    SPEED_PROMPT,
    "Write a Python function that returns the n-th Fibonacci number.",
    "Give three short tips for staying focused while studying.",
]


def repeat_timed(run: Callable[[], dict], warmup: int, repeats: int, warmup_run: Callable[[], dict] | None = None) -> list[dict]:
    """Call `warmup_run` (default `run`) `warmup` times, discarding what it measured, then `run` `repeats` times."""
    for _ in range(warmup):
        (warmup_run or run)()
    return [run() for _ in range(repeats)]


def chat_prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt in the model's chat format (plain text when it has no chat template). [1, tokens]"""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        return encoded["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, new_tokens: int, sync: Callable[[], None]) -> dict:
    """Greedy decoding of exactly `new_tokens` tokens (EOS ignored), timing prefill and decode separately."""
    sync()
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    first = time.perf_counter()
    cache = out.past_key_values
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    sync()
    end = time.perf_counter()
    return {"ttft_s": first - start, "decode_s": end - first, "total_s": end - start}


class TransformersEngine:
    """The ordinary path: a transformers model, eager forward, dynamic KV cache (`--runtime transformers`)."""

    name = "transformers"

    def __init__(self, model) -> None:
        self.model = model
        self.device = model_device(model)
        self.sync = synchronizer(self.device)

    def timed(self, input_ids: torch.Tensor, new_tokens: int) -> dict:
        return greedy_decode(self.model, input_ids, new_tokens, self.sync)

    @torch.no_grad()
    def complete(self, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id: int | None,
                 pad_token_id: int | None) -> list[torch.Tensor]:
        """Greedy answers to all prompts in one batch (left-padded, masked): one decode pass serves them all, which
        is what makes samples affordable on a CPU."""
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        length = max(p.shape[1] for p in prompts)
        ids = torch.full((len(prompts), length), pad if pad is not None else 0, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, length - prompt.shape[1]:] = prompt[0]
            mask[row, length - prompt.shape[1]:] = 1
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=pad)
        answers = []
        for row in out[:, length:]:  # a row that ended early is padded after its end-of-sequence token
            ends = (row == eos_token_id).nonzero() if eos_token_id is not None else []
            answers.append(row[:int(ends[0]) + 1] if len(ends) else row)
        return answers


class FastEngine:
    """ptqlab's runtime (`--runtime fast`): quantized kernels, static KV cache, CUDA-graph decode on GPUs. One
    Generator (cache and captured graph) per batch size, each made once."""

    name = "fast"

    def __init__(self, model, max_length: int) -> None:
        self.model, self.max_length = model, max_length
        self.device = model.device
        self.generators = {}

    def _generator(self, batch_size: int):
        from ptqlab.runtime import Generator  # start-up time: the runtime imports Triton; only a run of the fast runtime needs it

        if batch_size not in self.generators:
            self.generators[batch_size] = Generator(self.model, batch_size, self.max_length)
        return self.generators[batch_size]

    def timed(self, input_ids: torch.Tensor, new_tokens: int) -> dict:
        return self._generator(input_ids.shape[0]).timed(input_ids, new_tokens)

    def complete(self, prompts: list[torch.Tensor], max_new_tokens: int, eos_token_id: int | None,
                 pad_token_id: int | None) -> list[torch.Tensor]:
        return [self._generator(1).generate(ids, max_new_tokens, eos_token_id)[0] for ids in prompts]


def measure_speed(engine, prompt_ids: torch.Tensor, new_tokens: int = 128, batch_size: int = 8, repeats: int = 3,
                  warmup: int = 1, batch_sizes: tuple[int, ...] = ()) -> dict:
    """TTFT and decode tok/s at batch 1, generated tok/s at `batch_size` (the prompt [1, P] in every row), and the
    sweep: decode tok/s of all sequences together at every batch size of `batch_sizes` (and 1 and `batch_size`),
    which is where a variant that wins at batch 1 can lose at 32."""
    ids = prompt_ids.to(engine.device)
    # A short warm-up reaches every code path (prefill, cache growth, decode) at a fraction of the cost.
    warm = min(new_tokens, WARMUP_TOKENS)
    runs = {}
    for size in sorted({1, batch_size, *batch_sizes}):
        batch = ids.expand(size, -1).contiguous()
        runs[size] = repeat_timed(lambda: engine.timed(batch, new_tokens), warmup, repeats,
                                  lambda: engine.timed(batch, warm))
    single, batched = runs[1], runs[batch_size]
    sweep = {size: {"batch": size, "decode_tok_s": statistics.median(size * (new_tokens - 1) / r["decode_s"] for r in timed),
                    "throughput_tok_s": statistics.median(size * new_tokens / r["total_s"] for r in timed)}
             for size, timed in runs.items()}
    return {
        "runtime": engine.name,
        "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in single),
        "decode_tok_s": sweep[1]["decode_tok_s"],
        "throughput_tok_s": sweep[batch_size]["throughput_tok_s"],
        "sweep": list(sweep.values()),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": {"batch1": single, "batched": batched,
                    **{f"batch{size}": timed for size, timed in runs.items() if size not in (1, batch_size)}},
    }


def sample_completions(engine, tokenizer, max_new_tokens: int = 64, prompts: list[str] = SAMPLE_PROMPTS) -> list[dict]:
    """Greedy answers to fixed chat prompts, stopping at EOS (this is about what the model says)."""
    ids = [chat_prompt_ids(tokenizer, prompt).to(engine.device) for prompt in prompts]
    answers = engine.complete(ids, max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return [{"prompt": prompt, "completion": tokenizer.decode(tokens, skip_special_tokens=True)}
            for prompt, tokens in zip(prompts, answers)]
