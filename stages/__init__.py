"""The thin DVC layer: one module per stage of dvc.yaml, the params loader and the CLI."""
