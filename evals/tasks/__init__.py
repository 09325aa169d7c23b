"""Local lm-eval task definitions (YAML) and the generator of their data (`build_data`)."""
