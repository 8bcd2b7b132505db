"""Generic evaluation: Frechet distance on any features, image grids, the sampling harness and
the steps-vs-quality report. A world supplies the evaluator (images, prompts) -> metrics."""
