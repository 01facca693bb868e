"""Large collections: input specs -> shards (sources.py: WebDataset tars, parquet/CSV tables, groups of
loose files), sharded, distributed, resumable captioning and merge (run.py), result files (outputs.py).
"""
