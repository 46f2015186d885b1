"""Mixture-of-Experts: router -> dispatcher -> experts = MoELayer, and the transformer using it.

Belongs here: routing (pure functions on logits), token dispatch (local, simulated and
all-to-all), stacked experts, the composed layer, aux losses, and the transformer model.
Uses ``attention/`` and ``parallel/``; never imports deepspeed (that lives in
``parallel/deepspeed_bridge.py``).
"""
