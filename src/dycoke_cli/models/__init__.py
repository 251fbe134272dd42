"""Model families and loading: the family seam (base.py), one module per family
(llava_onevision.py, qwen2_5_vl.py), the registry of families (registry.py), finding and
checking checkpoints (loader.py, checkpoint.py), frame preprocessing (preprocess.py) and tiny
random checkpoints for tests (tiny.py)."""
