"""SeedNet's core: the network and its config, the served graph (normalisation inside),
exports proven against a golden set, and the CIFAR-10 constants.

Imported by ``training`` and ``service`` alike; never imports either, nor FastAPI.
"""
