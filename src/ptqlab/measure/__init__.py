"""Measuring one variant: size, load time, memory, perplexity, KL, speed and samples, in a process of its own.

Named `measure`, not `bench`, so that `ptqlab.bench` has one meaning: the verb that benchmarks folders side by side
(ptqlab.benchmark.bench), which uses this package for each variant.
"""
