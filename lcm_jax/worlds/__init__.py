"""Bundled worlds: self-contained text-to-image problems with their own data, models, evaluator
and configs, for showing and testing distillation without Stable Diffusion's weights. The core
never imports a world; a world plugs in through the data-source registry, an evaluator passed to
`lcm-jax eval`, and the training sample-grid hook."""
