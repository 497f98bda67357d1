"""DVC plot files ``ptqflow init`` puts into a project's ``.dvc/plots`` (the checkout's ``.dvc/plots`` links
here): the ``labelled`` scatter template and the plot page with a declared charset."""
