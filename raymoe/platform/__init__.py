"""Pure-PyTorch core of raymoe: the MoE layer, the GPT-MoE model, data, checkpoints, generation.

Nothing in this package imports ray (tests/unit/test_layering.py enforces it).
"""
