"""Frechet distance against closed forms, the shipped classifier on real and noise images, grids."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import lcm_jax.worlds.shapes as shapes_world
from lcm_jax.evaluation import frechet, grids, harness, report
from lcm_jax.convert.common import WeightsError
from lcm_jax.worlds.shapes import evaluator as shapes_eval
from lcm_jax.worlds.shapes import world as shapes


def _with_moments(rng, n, mean, cov):
    """n samples whose empirical mean and (unbiased) covariance are exactly `mean` and `cov`."""
    x = rng.standard_normal((n, len(mean)))
    x -= x.mean(0)
    x = x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
    return x @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_form():
    # Covariances sharing eigenvectors Q: FD = |m1 - m2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    x = _with_moments(rng, 500, m1, q @ np.diag(a) @ q.T)
    y = _with_moments(rng, 700, m2, q @ np.diag(b) @ q.T)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert abs(frechet.frechet_distance(x, y) - expected) <= 1e-8 * expected


def test_frechet_distance_matches_scipy_on_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    s1 = np.cov(rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8)), rowvar=False)
    s2 = np.cov(rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8)), rowvar=False)
    m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
    ref = (np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
           - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    ours = frechet.frechet_distance_from_stats(m1, s1, m2, s2)
    assert abs(ours - ref) <= 1e-7 * abs(ref)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(2).standard_normal((300, 32)) * 3 + 1
    assert frechet.frechet_distance(feats, feats) < 1e-8 * np.trace(np.cov(feats, rowvar=False))
    assert frechet.frechet_distance(feats, feats + 0.5) == pytest.approx(32 * 0.25, rel=1e-8)
    with pytest.raises(ValueError, match="differ in width"):
        frechet.frechet_distance(feats, feats[:, :4])


@pytest.fixture(scope="module")
def evaluator():
    return shapes_eval.ShapesEvaluator(num_real=500)


def test_classifier_reads_real_images_and_not_noise(evaluator):
    prompts, attrs = shapes_eval.heldout_prompts(250)
    images, captions, _ = shapes.ShapesWorld(shapes.EVAL_SEED, shapes.UNDERSTATED).batch(range(250))
    assert prompts == captions
    real = evaluator(images.astype(np.float32) / 255, prompts)
    assert real["prompt_accuracy"] >= 0.97, real
    noise = np.random.default_rng(0).uniform(0, 1, images.shape).astype(np.float32)
    fake = evaluator(noise, prompts)
    assert fake["prompt_accuracy"] <= 0.02, fake
    # Real images of another part of the world are far closer to the reference set than noise.
    assert real["fd"] < 0.05 * fake["fd"], (real["fd"], fake["fd"])


def test_accuracy_judges_only_what_a_prompt_states(evaluator):
    images, _, _ = shapes.ShapesWorld(shapes.EVAL_SEED).batch(range(2))
    x = images.astype(np.float32) / 255
    full = [shapes.caption_from_attrs(shapes.ShapesWorld(shapes.EVAL_SEED).attrs(i)) for i in range(2)]
    assert evaluator.prompt_accuracy(x, full)["prompt_accuracy"] == 1.0, full
    wrong = []   # each prompt's first shape in another colour, then that colour left out
    for caption in full:
        a = shapes.parse_caption(caption)
        a["color"][0] = next(c for c in range(len(shapes.COLORS)) if c != a["color"][0]
                             and shapes.COLORS[c] != shapes.BACKGROUNDS[a["background"]])
        wrong.append(shapes.caption_from_attrs(a))
    got = evaluator.prompt_accuracy(x, wrong)
    assert got["prompt_accuracy"] == 0.0 and got["acc/color"] == 0.0 and got["acc/shape"] == 1.0
    silent = []
    for caption in wrong:
        a = shapes.parse_caption(caption)
        a["color"][0] = shapes.UNSTATED
        silent.append(shapes.caption_from_attrs(a))
    assert evaluator.prompt_accuracy(x, silent)["prompt_accuracy"] == 1.0, silent


def test_diversity_is_one_for_the_world_and_zero_for_one_image(evaluator):
    prompts = ["a circle on a gray background"] * 6 + ["a small red star at the top"] * 6
    rng = np.random.default_rng(5)
    real = [shapes.fill(shapes.parse_caption(p), rng) for p in prompts]
    images = shapes.render_batch(shapes.stack_attrs([a for a, _ in real]), np.stack([j for _, j in real]))
    varied = evaluator.diversity(images.astype(np.float32) / 255, prompts)
    assert 0.75 < varied < 1.33, varied
    same = np.repeat(images[::6], 6, axis=0).astype(np.float32) / 255
    assert evaluator.diversity(same, prompts) < 1e-3
    with pytest.raises(ValueError, match="at least two images per prompt"):
        evaluator.diversity(images[:3].astype(np.float32) / 255, ["a star", "a circle", "a star"])


def test_heldout_prompts_are_fixed_and_parse():
    prompts, attrs = shapes_eval.heldout_prompts(20)
    assert shapes_eval.heldout_prompts(20)[0] == prompts
    assert prompts != shapes_eval.heldout_prompts(20, seed=0)[0]
    parsed = shapes.stack_attrs([shapes.parse_caption(p) for p in prompts])
    for key in shapes.ATTR_KEYS:   # the attributes are the images' truth; a prompt may omit some
        said = parsed[key]
        np.testing.assert_array_equal(np.where(said == shapes.UNSTATED, attrs[key], said), attrs[key])
    assert (parsed["background"] == shapes.UNSTATED).any()
    assert shapes_eval.heldout_prompts(20, understated=0.0)[0] == [
        shapes.caption_from_attrs(shapes.ShapesWorld(shapes.EVAL_SEED).attrs(i)) for i in range(20)]


def test_cell_targets_round_trip_to_attributes():
    _, attrs = shapes_eval.heldout_prompts(500, seed=3)
    cells = shapes_eval.attrs_to_cells(attrs)
    assert cells["shape"].shape == (500, 9)
    back = shapes_eval.cells_to_attrs(cells)
    for key in shapes.ATTR_KEYS:
        np.testing.assert_array_equal(back[key], attrs[key])
    cells["shape"][:, :] = 0                                   # a shape in every cell
    assert (shapes_eval.cells_to_attrs(cells)["num_shapes"] == 9).all()


def test_evaluator_rejects_wrong_image_size(evaluator):
    with pytest.raises(ValueError, match=r"expected images \(N, 64, 64, 3\)"):
        evaluator.features(np.zeros((2, 32, 32, 3), np.float32))


def test_load_classifier_errors(tmp_path):
    with pytest.raises(WeightsError, match="no classifier config"):
        shapes_eval.load_classifier(str(tmp_path))
    bad = tmp_path / "bad"
    shutil.copytree(shapes_world.CLASSIFIER_DIR, bad)
    config = json.loads((bad / "config.json").read_text())
    config["features"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError,
                       match=r"cell_mlp_0/bias has shape \(128,\), the config needs \(7,\)"):
        shapes_eval.load_classifier(str(bad))


def test_shipped_classifier_is_small():
    size = os.path.getsize(os.path.join(shapes_world.CLASSIFIER_DIR, "model.safetensors"))
    assert size < 2 * 2**20


def test_save_grid(tmp_path):
    images = np.random.default_rng(0).uniform(0, 1, (10, 64, 64, 3))
    path = str(tmp_path / "grid.png")
    assert grids.save_grid(images, path, nrow=4) == (4 * 66 + 2, 3 * 66 + 2)
    assert Image.open(path).size == (266, 200)
    size = grids.save_grid(images, path, nrow=5, labels=["1 step", "4 steps"])
    assert Image.open(path).size == size and size[0] > 5 * 66 + 2 and size[1] == 2 * 66 + 2
    with pytest.raises(ValueError, match="3 labels for 2 rows"):
        grids.save_grid(images, path, nrow=5, labels=["a", "b", "c"])


def test_one_step_distance_to_the_teachers_ode_endpoint():
    from lcm_jax.pipeline import LCMPipeline

    teacher = LCMPipeline.from_pretrained(os.path.join(os.path.dirname(shapes_world.CLASSIFIER_DIR),
                                                       "teacher"))
    prompts, _ = shapes_eval.heldout_prompts(5)
    # Two chunks of 4 (the second padded): each prompt keeps the noise row of its own chunk.
    got = harness.one_step_distances([(teacher, 1.0), (teacher, 3.0)], teacher, prompts, 3.0,
                                      seed=7, batch=4)
    sq = {1.0: [], 3.0: []}
    for i, s in enumerate((0, 4)):
        chunk = (prompts[s:s + 4] + [prompts[-1]] * 4)[:4]
        ref = teacher(chunk, 50, 3.0, 64, 64, seed=7 + i, sampler="ddim", compile="model")
        for g in sq:
            one = teacher(chunk, 1, g, 64, 64, seed=7 + i, sampler="lcm", compile="model")
            sq[g].append(np.square(one - ref).reshape(4, -1).mean(1)[:len(prompts) - s])
    want = [float(np.sqrt(np.concatenate(sq[g]).mean())) for g in (1.0, 3.0)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The teacher's one-step x0 under CFG is extrapolated far past the ODE's endpoint.
    assert 0.0 < got[0] < got[1]


def test_endpoint_errors_from_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval_loss": 0.1, "endpoint_mse/t999": 0.4, "endpoint_mse/t259": 0.02},
            {"step": 5, "loss": 0.2},
            {"step": 10, "eval_loss": 0.09, "endpoint_mse/t999": 0.3, "endpoint_mse/t259": 0.01}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, errors = report.read_endpoint_errors(str(path))
    assert steps == [0, 10] and errors == {999: [0.4, 0.3], 259: [0.02, 0.01]}
    assert list(errors) == [999, 259]
    md = report.endpoint_markdown(steps, errors)
    assert "| 10 | 0.3000 | 0.0100 |" in md and "from t=999" in md
    report.plot_endpoint_errors(steps, errors, str(tmp_path / "endpoint.png"))
    assert (tmp_path / "endpoint.png").stat().st_size > 1000
    (tmp_path / "none.jsonl").write_text(json.dumps({"step": 5, "loss": 0.2}) + "\n")
    with pytest.raises(ValueError, match="none.jsonl has no endpoint_mse"):
        report.read_endpoint_errors(str(tmp_path / "none.jsonl"))


def test_oracle_lcm_one_step_is_diffusers_ddim_on_the_skipping_grid(tmp_path):
    """oracle_generate at one step is the end of the teacher's CFG DDIM chain over the skipping
    grid 999, 979, ..., 19 down to t = 0: diffusers' DDIMScheduler with trailing spacing and
    final alpha abar_0, from the same starting latents; at more steps it differs."""
    import jax
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lcm_jax.evaluation.harness import oracle_generate
    from lcm_jax.pipeline import LCMPipeline
    from tiny_pipeline import build_pipeline

    folder = str(tmp_path / "teacher")
    tp = build_pipeline(folder, time_cond_proj_dim=None)
    pipe = LCMPipeline.from_pretrained(folder)
    prompts, guidance = ["a red circle", "a blue square"], 3.0
    ours = oracle_generate(pipe, prompts, 1, guidance, seed=5, batch=2)
    latents = jax.random.normal(jax.random.split(jax.random.PRNGKey(5))[0], (2, 8, 8, 4))

    ddim = DDIMScheduler.from_config(tp.scheduler.config, timestep_spacing="trailing",
                                     set_alpha_to_one=False, clip_sample=False, steps_offset=0)
    sd = StableDiffusionPipeline(vae=tp.vae, text_encoder=tp.text_encoder, tokenizer=tp.tokenizer,
                                 unet=tp.unet, scheduler=ddim, safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():
        ref = sd(prompts, num_inference_steps=50, guidance_scale=guidance, height=64, width=64,
                 latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy()),
                 output_type="np").images
    err = np.abs(ours - ref).max()
    print("oracle vs diffusers DDIM on the grid, max image difference:", err)
    assert err < 2e-3, err
    four = oracle_generate(pipe, prompts, 4, guidance, seed=5, batch=2)
    assert np.abs(four - ours).max() > 10 * err  # re-noising and three more chains change it
    with pytest.raises(ValueError, match="teacher"):
        oracle_generate(LCMPipeline.from_pretrained(_student_folder(tmp_path)), prompts, 1, guidance)


def _student_folder(tmp_path):
    from tiny_pipeline import build_pipeline

    folder = str(tmp_path / "student")
    build_pipeline(folder)
    return folder
