"""Large collections: input specs -> shards (sources.py: WebDataset tars, parquet/CSV tables, groups of
loose files), sharded, distributed, resumable captioning (run.py), the shard plan and merge (merge.py),
result and errors files (outputs.py), and the caption-to-file workflow of `caption -o` (caption_file.py).
"""
