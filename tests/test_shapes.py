"""The shapes world: determinism, captions that say what the pixels show, the tokenizer."""
import json

import numpy as np
import pytest
from PIL import Image

from lcm_jax.worlds.shapes import world as shapes

from lcm_jax.worlds.shapes import TOKENIZER_DIR


@pytest.fixture(scope="module")
def samples():
    return shapes.ShapesWorld(0).batch(range(1000))


def _rgb(name):
    return np.array(shapes._RGB[name], np.uint8)


def test_deterministic_per_seed_and_index(samples):
    images, captions, attrs = samples
    image, caption, one = shapes.ShapesWorld(0).sample(17)
    np.testing.assert_array_equal(image, images[17])
    assert caption == captions[17]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    again, _, _ = shapes.ShapesWorld(0).batch([17, 3])
    np.testing.assert_array_equal(again, images[[17, 3]])
    other, other_captions, _ = shapes.ShapesWorld(1).batch(range(20))
    assert other_captions != captions[:20] and not np.array_equal(other, images[:20])


def test_attributes_are_valid(samples):
    _, captions, attrs = samples
    n = attrs["num_shapes"]
    assert set(np.unique(n)) == {1, 2}
    assert (attrs["shape"][n == 1, 1] == -1).all() and (attrs["shape"][n == 2] >= 0).all()
    two = n == 2
    assert (attrs["position"][two, 0] < attrs["position"][two, 1]).all()   # reading order
    for bg, colors, k in zip(attrs["background"], attrs["color"], n):
        assert shapes.BACKGROUNDS[bg] not in {shapes.COLORS[c] for c in colors[:k]}
    assert len(set(captions)) > 900


def test_caption_round_trip_and_vocabulary(samples):
    _, captions, attrs = samples
    vocab = set(shapes.vocabulary())
    for i, caption in enumerate(captions):
        parsed = shapes.parse_caption(caption)
        for key in shapes.ATTR_KEYS:
            np.testing.assert_array_equal(parsed[key], attrs[key][i])
        assert shapes.caption_from_attrs(parsed) == caption
        assert set(caption.split()) <= vocab
    assert shapes.parse_caption("A small RED circle  in the center on a gray background")[
        "position"][0] == shapes.POSITIONS.index("center")


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        shapes.parse_caption("a small red hexagon at the top on a gray background")
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        shapes.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="puts both shapes at the top"):
        shapes.parse_caption("a small red star at the top and a large blue star at the top on a "
                             "gray background")
    with pytest.raises(ValueError, match="shape of the background colour"):
        shapes.parse_caption("a small white star at the top on a white background")


def test_parse_caption_puts_shapes_in_reading_order():
    swapped = ("a large blue square at the bottom right and a small red circle at the top left "
               "on a gray background")
    canonical = ("a small red circle at the top left and a large blue square at the bottom right "
                 "on a gray background")
    assert shapes.caption_from_attrs(shapes.parse_caption(swapped)) == canonical


def test_pixels_show_the_caption(samples):
    images, _, attrs = samples
    blended = []
    for i in range(200):
        image, k = images[i], attrs["num_shapes"][i]
        bg = _rgb(shapes.BACKGROUNDS[attrs["background"][i]])
        changed = np.any(image != bg, axis=-1)
        cells = np.zeros((64, 64), bool)
        for slot in range(k):
            r, c = divmod(int(attrs["position"][i, slot]), 3)
            y0, x0 = int(r * 64 / 3), int(c * 64 / 3)
            cell = image[y0:y0 + 21, x0:x0 + 21]
            color = _rgb(shapes.COLORS[attrs["color"][i, slot]])
            full = np.all(cell == color, axis=-1).sum()
            mixed = (np.any(cell != color, -1) & np.any(cell != bg, -1)).sum()
            assert full >= 10, (i, slot, full)
            blended.append(mixed >= 4)
            cells[y0:y0 + 22, x0:x0 + 22] = True
        assert not (changed & ~cells).any(), f"sample {i} has pixels outside its shapes' cells"
    assert np.mean(blended) > 0.95   # anti-aliased edges (a square can land on pixel edges)


def test_understated_captions_leave_attributes_out_and_keep_the_images(samples):
    images, full, attrs = samples
    world = shapes.ShapesWorld(0, understated=0.5)
    same, captions, same_attrs = world.batch(range(1000))
    np.testing.assert_array_equal(same, images)          # the images do not depend on the rate
    changed = [c != f for c, f in zip(captions, full)]
    assert 0.45 < np.mean(changed) < 0.55
    vocab = set(shapes.vocabulary())
    for i, caption in enumerate(captions):
        parsed = shapes.parse_caption(caption)
        assert shapes.caption_from_attrs(parsed) == caption and set(caption.split()) <= vocab
        unstated = 0
        for key in shapes.ATTR_KEYS:   # what is stated is the truth of the image
            said, truth = np.asarray(parsed[key]), np.asarray(attrs[key][i])
            unstated += int((said == shapes.UNSTATED).sum())
            assert np.all((said == truth) | (said == shapes.UNSTATED)), (caption, key)
        assert (unstated > 0) == changed[i], caption
    one = shapes.parse_caption("a red circle and a large square at the bottom right")
    assert one["background"] == shapes.UNSTATED and list(one["position"]) == [shapes.UNSTATED, 8]
    assert list(one["size"]) == [shapes.UNSTATED, 1] and list(one["color"]) == [0, shapes.UNSTATED]
    with pytest.raises(ValueError, match="understated must be a fraction"):
        shapes.ShapesWorld(0, understated=1.5)


def test_fill_draws_images_the_caption_describes():
    stated = shapes.parse_caption("a red circle and a large square at the bottom right")
    rng = np.random.default_rng(0)
    drawn = [shapes.fill(stated, rng)[0] for _ in range(200)]
    for a in drawn:
        assert a["num_shapes"] == 2 and list(a["shape"]) == [0, 1] and a["color"][0] == 0
        assert a["size"][1] == 1 and a["position"][1] == 8 and a["position"][0] < 8
        assert shapes.BACKGROUNDS[a["background"]] not in {shapes.COLORS[c] for c in a["color"]}
    # The unstated attributes vary: every background the scene allows, many first cells.
    assert len({a["background"] for a in drawn}) >= 3 and len({a["position"][0] for a in drawn}) >= 6


def test_large_shapes_are_larger():
    world = shapes.ShapesWorld(0)
    attrs = shapes.stack_attrs([world.attrs(i) for i in range(400)])
    images = shapes.render(attrs, np.zeros((400, 2, 3)))
    bg = np.array([shapes._RGB[shapes.BACKGROUNDS[b]] for b in attrs["background"]], np.uint8)
    area = np.any(images != bg[:, None, None], -1).sum((1, 2))
    one = attrs["num_shapes"] == 1
    for k in range(len(shapes.SHAPES)):
        kind = one & (attrs["shape"][:, 0] == k)
        small, large = area[kind & (attrs["size"][:, 0] == 0)], area[kind & (attrs["size"][:, 0] == 1)]
        assert len(small) and len(large) and small.max() < large.min(), shapes.SHAPES[k]


def test_write_image_folder(tmp_path, samples):
    world = shapes.ShapesWorld(0)
    meta = shapes.write_image_folder(world, str(tmp_path / "folder"), num=5, start=10)
    lines = [json.loads(line) for line in open(meta)]
    assert [m["file_name"] for m in lines] == [f"{i:08d}.png" for i in range(10, 15)]
    assert [m["text"] for m in lines] == samples[1][10:15]
    png = np.asarray(Image.open(tmp_path / "folder" / lines[2]["file_name"]))
    np.testing.assert_array_equal(png, samples[0][12])


def test_bad_seed_and_index():
    with pytest.raises(ValueError, match="non-negative int"):
        shapes.ShapesWorld(-1)
    with pytest.raises(ValueError, match="index must be non-negative"):
        shapes.ShapesWorld(0).sample(-3)


def test_tokenizer_covers_every_caption(samples):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    words = {w: tok.convert_tokens_to_ids(w + "</w>") for w in shapes.vocabulary()}
    assert tok.eos_token_id not in words.values()
    captions = samples[1]
    enc = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=False)
    for caption, ids in zip(captions, enc.input_ids):
        assert len(ids) == tok.model_max_length
        body = ids[1:ids.index(tok.eos_token_id)]
        assert ids[0] == tok.bos_token_id
        assert body == [words[w] for w in caption.split()], caption
        assert tok.decode(ids, skip_special_tokens=True) == caption
