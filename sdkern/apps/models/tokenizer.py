"""A CLIP tokenizer generated offline (byte-level BPE vocabulary of every byte, no merges), cached on disk.

The vocabulary does not matter for random weights; the files are what ``CLIPTokenizer`` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def _cache_dir() -> Path:
    root = os.environ.get("SDKERN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sdkern"
    )
    return Path(root)


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-character map that CLIP's byte-level BPE uses.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_tokenizer_files(directory: Path) -> None:
    """Write a small CLIP BPE vocabulary: every byte, every byte at word end, a few merges, specials."""
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    # A handful of merges so that common words become one token (content is irrelevant for random weights).
    words = ["a", "the", "of", "photo", "cat", "dog", "astronaut", "horse", "painting", "mountain", "city"]
    merges: list[tuple[str, str]] = []
    for w in words:
        pieces = [*w[:-1], w[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"vocab.json.{os.getpid()}"
    tmp.write_text(json.dumps(vocab, ensure_ascii=False))
    tmp.replace(directory / "vocab.json")
    tmp = directory / f"merges.txt.{os.getpid()}"
    tmp.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tmp.replace(directory / "merges.txt")


def make_tokenizer(pad_token: str = _EOS, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """Generate a ``CLIPTokenizer`` (vocabulary of ~560 tokens, ``model_max_length`` 77).

    Parameters
    ----------
    pad_token : str
        ``"<|endoftext|>"`` as in SD 1.x, or ``"!"`` as in SD 2.x / SDXL's second tokenizer.
    cache_dir : path, optional
        Where ``vocab.json`` and ``merges.txt`` are written; default ``$SDKERN_CACHE/tokenizer``
        (``~/.cache/sdkern/tokenizer``).
    """
    from transformers import CLIPTokenizer

    directory = Path(cache_dir) if cache_dir is not None else _cache_dir() / "tokenizer"
    if not (directory / "vocab.json").is_file() or not (directory / "merges.txt").is_file():
        _write_tokenizer_files(directory)
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        bos_token=_BOS,
        eos_token=_EOS,
        unk_token=_EOS,
        pad_token=pad_token,
        model_max_length=77,
    )
