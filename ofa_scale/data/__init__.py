"""Data plane: TSV → shards (convert), tokenizers, and the streaming, resumable loader."""
