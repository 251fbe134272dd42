"""Model families beyond LLaVA-OneVision (whose adapter lives in model.py): one module each,
each an adapter class listed in ``model._families``."""
