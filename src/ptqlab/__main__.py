"""`python -m ptqlab`: the command line (what `torchrun -m ptqlab` and `ptqlab quantize --gpus N` start per rank)."""

from ptqlab.cli import main

main()
