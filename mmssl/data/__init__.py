"""Data layer: webdataset shards in, batch dicts out; knows nothing about models."""
