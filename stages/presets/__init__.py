"""Params files ``ptqflow init`` writes: the ImageNet presets (``pipelines/<name>/params.yaml`` link
here) and the image-folder template."""
