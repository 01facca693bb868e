"""Large collections: input specs -> shards (sources.py: expansion, parquet/CSV tables, groups of loose
files; tar.py: WebDataset tars; items.py: Shard and Item), sharded, distributed, resumable captioning
(run.py), the shard plan and merge (merge.py), result and errors files (outputs.py), and the
caption-to-file workflow of `caption -o` (caption_file.py).
"""
