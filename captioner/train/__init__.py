"""Training: the one loop (loop.py: accelerate, length-bucketed batches, validation, resume) and the
persistent feature cache (features.py).
"""
