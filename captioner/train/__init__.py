"""Training: the one loop (loop.py: accelerate, validation, non-finite steps), its batching (batching.py:
length-bucketed batches sharded across processes, modality dropout), the resumable state without pickles
(state.py) and the persistent feature cache (features.py).
"""
