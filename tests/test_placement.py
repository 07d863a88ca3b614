"""Placement (engine/placement.py): layers offloaded and prefetched, hidden states in pinned CPU memory, change
where tensors wait, never what is computed: the checkpoint tensors are bitwise those of a run that keeps everything
on the GPU. Needs a GPU (pinned memory and side streams are CUDA's)."""

import copy

import pytest
import torch

from ptqlab.data import CalibrationSet
from ptqlab.formats.compressed_tensors import checkpoint_tensors
from ptqlab.pipeline import quantize_model
from ptqlab.recipes import get_recipe
from tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("recipe", ["w4a16", "w8a8"])
def test_offloaded_layers_and_pinned_activations_give_the_same_checkpoint(recipe):
    model = tiny_model("llama", torch.bfloat16, num_hidden_layers=4)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (40, 40, 33, 28, 17, 9)]
    calibration = CalibrationSet(samples, "random tokens")
    results = {}
    for placement in [dict(offload=False, activations_on_gpu=True), dict(offload=True, activations_on_gpu=False),
                      dict(offload=True, activations_on_gpu=True)]:
        quantized = copy.deepcopy(model)
        quantize_model(quantized, get_recipe(recipe), calibration, quiet=True, device=torch.device("cuda"),
                       batch_size=2, **placement)
        results[tuple(placement.values())] = {k: v.cpu() for k, v in checkpoint_tensors(quantized).items()}
    reference = results.pop((False, True))
    for placement, tensors in results.items():
        assert tensors.keys() == reference.keys()
        for name, tensor in tensors.items():
            assert torch.equal(tensor, reference[name]), (placement, name)
