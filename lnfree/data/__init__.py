"""Text data: the built-in corpus and tokenizer (corpus), document streams (streams), the DataModule (datamodule)."""
