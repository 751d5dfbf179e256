"""Raw text -> WordPiece tokenizer -> Google-exact prebuilt BERT examples -> WebDataset shards.

CLIs: ``python -m data.tokenizer``, ``python -m data.build``, ``python -m data.merge``,
``python -m data.inspect``, ``python -m data.corpus OUT`` (offline stdlib-docstring corpus).
Reading API for training: ``data.shards`` (``read_manifest``, ``shard_paths``, ``decode_sample``,
``iter_examples``). Submodules are not imported here so ``import data`` stays cheap.
"""
