"""Writes the CLIP-format tokenizer of the shapes world to lcm_jax/worlds/shapes/assets/tokenizer/.

    python lcm_jax/worlds/shapes/make_tokenizer.py [--out DIR] [--max_length 32]

The vocabulary is word-level: each caption word `w` is one token `w</w>`, as in CLIP. BPE merges
build words from the end: `e d</w> -> ed</w>`, then `r ed</w> -> red</w>`. Every merge has a
right part ending in `</w>`, so at any time a word is single characters plus one suffix token and
exactly one merge can apply; every word therefore ends as one token whatever the merge order.
Single characters (with and without `</w>`) are in the vocabulary, so unknown words still
tokenise (as pieces). <|startoftext|> and <|endoftext|> are the last two ids, so
`argmax(input_ids)` finds the end-of-text token as in the original CLIP.

Loadable with `transformers.CLIPTokenizer.from_pretrained(DIR)`.
"""
from __future__ import annotations

import argparse
import json
import os
import string

from lcm_jax.worlds.shapes import world as shapes

from lcm_jax.worlds.shapes import TOKENIZER_DIR as DEFAULT_OUT
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Token ids and suffix-building merges for a word-level CLIP BPE vocabulary."""
    tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    merges = []
    for word in sorted(words):
        for start in range(len(word) - 2, -1, -1):   # suffix word[start:] from word[start+1:]
            merge = f"{word[start]} {word[start + 1:]}</w>"
            if merge not in merges:
                merges.append(merge)
                tokens.append(word[start:] + "</w>")
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out_dir: str, words: list[str], model_max_length: int = 32) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json."""
    os.makedirs(out_dir, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    with open(os.path.join(out_dir, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=1)
    with open(os.path.join(out_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **specials}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2)
    print(f"wrote {out_dir}: {len(vocab)} tokens, {len(merges)} merges, "
          f"model_max_length {model_max_length}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--max_length", type=int, default=32)
    args = parser.parse_args()
    write_tokenizer(os.path.normpath(args.out), shapes.vocabulary(), args.max_length)


if __name__ == "__main__":
    main()
