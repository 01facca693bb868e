"""Large collections: input specs -> shards (sources.py: expansion, parquet/CSV tables, groups of loose
files; tar.py: WebDataset tars; items.py: Shard and Item), sharded, distributed, resumable captioning and
merge (run.py), result files (outputs.py).
"""
