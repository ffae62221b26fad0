"""Data: sources (records), tokenizer, features and grain pipelines."""
