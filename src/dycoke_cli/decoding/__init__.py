"""From embeddings to tokens: the prompt around the video (prompt.py), the decoding loop
(loop.py) with its eager and static-shape steps (static.py), the one call into transformers'
decoder layers (layer_call.py), and incremental detokenisation (detokenize.py)."""
