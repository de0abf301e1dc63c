"""Standard-library-only helpers, loadable by path before torch is imported (fine-tune.py)."""
