"""Decoding over a prefix of LM embeddings: search.py (greedy, beam, nucleus over a `Stepper`) and
fast.py (static KV cache / CUDA graphs, packed LM head on CPU) behind the same interface;
rerank.py reorders several candidates per image by a scorer (CLIPScore).
"""
