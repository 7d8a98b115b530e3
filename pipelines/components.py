"""Components of the Stable Diffusion family, built from configurations with random weights.

Two sizes of the same classes (diffusers ``UNet2DConditionModel`` / ``AutoencoderKL``,
transformers ``CLIPTextModel`` / ``CLIPTokenizer``):

- ``sd15``: the real Stable Diffusion 1.5 configurations, so that the loading and model code is
  exercised at full size without downloading anything;
- ``tiny``: the same classes a few thousand times smaller, for fast tests and the demo family.

The tokenizer of both is a real ``CLIPTokenizer`` over a character-level vocabulary written
here (CLIP's byte-level alphabet, no merges): the BPE vocabulary of CLIP cannot be downloaded on
an offline machine, and the text models here only need a tokenizer that behaves like CLIP's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AsymmetricAutoencoderKL, AutoencoderKL, AutoModel, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
}

TINY_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "sample_size": 64,
    "block_out_channels": (16, 32), "norm_num_groups": 8,
    "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
}
TINY_TEXT = {
    "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}
# The demo family (trained on Toybooru by ``python -m training.demo_zoo``): 64 px pictures,
# 16 x 16 x 4 latents, a CLIP whose text tower is the text encoder, and a UNet of 1.7 M parameters
# that attends (to itself and to the text) at 8 x 8 and 4 x 4 only: self-attention over the 256
# positions of the 16 x 16 level made a training step 2.5 times as long on a CPU
DEMO_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "sample_size": 64,
    "block_out_channels": (16, 32, 64), "norm_num_groups": 8,
    "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
}
DEMO_CLIP_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
DEMO_CLIP_VISION = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "image_size": 64, "patch_size": 8, "hidden_act": "quick_gelu"}
DEMO_CLIP_PROJECTION = 64
DEMO_UNET = {
    "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64, "attention_head_dim": 4, "norm_num_groups": 16,
}
SIZES = {
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT),
    "tiny": (TINY_UNET, TINY_VAE, TINY_TEXT),
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_char_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a character-level ``CLIPTokenizer`` (514 tokens) to ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder


def char_tokenizer(cache: str | Path | None = None) -> CLIPTokenizer:
    """The character-level CLIP tokenizer (written to a temporary folder unless ``cache``)."""
    import tempfile

    folder = Path(cache) if cache else Path(tempfile.mkdtemp(prefix="char-clip-tokenizer-"))
    if not (folder / "vocab.json").is_file():
        write_char_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_components(size: str = "tiny", seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> dict:
    """Random-weight ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {', '.join(SIZES)}")
    unet_cfg, vae_cfg, text_cfg = SIZES[size]
    tokenizer = tokenizer or char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **text_cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    if text_cfg["vocab_size"] < len(tokenizer):
        raise ValueError(f"a vocabulary of {text_cfg['vocab_size']} is too small for {len(tokenizer)} tokens")
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": PNDMScheduler(**SD15_SCHEDULER)}


VAE_CLASSES = (AutoencoderKL, AsymmetricAutoencoderKL)


def load_vae(path: str | Path, **kwargs) -> AutoencoderKL | AsymmetricAutoencoderKL:
    """The autoencoder saved at ``path`` (a folder or Hub id; ``kwargs`` go to ``from_pretrained``, e.g.
    ``subfolder``): an ``AutoencoderKL``, or the ``AsymmetricAutoencoderKL`` that a larger decoder trained on a
    frozen encoder makes (``train_vae --decoder-channels``; the same latents, so the same diffusion models).
    diffusers' ``AutoModel`` picks the class from the saved config."""
    try:  # a str: diffusers 0.42's AutoModel fails on a Path (it joins the path into a load id)
        vae = AutoModel.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load a VAE from {path}: {e}") from e
    if not isinstance(vae, VAE_CLASSES):
        raise ValueError(f"{path} holds a {type(vae).__name__}, not an AutoencoderKL or AsymmetricAutoencoderKL")
    return vae


def write_word_tokenizer(folder: str | Path, words, model_max_length: int = 77) -> Path:
    """Write a ``CLIPTokenizer`` whose vocabulary holds every word of ``words`` as one token.

    A real CLIP byte-level BPE: the 512 single characters (so any text still tokenizes) plus,
    for each word, the merges that build it from right to left. Every merge joins a character
    to a word ending ("...</w>"), and only a word's last symbol carries that ending, so BPE can
    only ever grow the ending leftwards: each word of ``words`` becomes exactly one token, and
    any other text still tokenizes (into its longest known ending and single characters).
    ``words`` are split as CLIP's tokenizer splits text (lower case; letters, digits and
    punctuation apart): "blue hair, polka dot shirt" is 6 tokens instead of 26 characters.
    """
    import regex

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_map = _bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    pieces = sorted({p for w in words for p in pattern.findall(str(w).lower())})
    if not pieces:
        raise ValueError("no words to build a tokenizer from")
    chars = list(byte_map.values())
    vocab_list = chars + [c + "</w>" for c in chars]
    known = set(vocab_list)
    merges: list[str] = []
    for piece in pieces:
        symbols = ["".join(byte_map[b] for b in ch.encode("utf-8")) for ch in piece]
        symbols[-1] += "</w>"
        current = symbols[-1]
        for prev in reversed(symbols[:-1]):  # right to left: only the last symbol ends in </w>
            merged = prev + current
            if merged not in known:
                merges.append(f"{prev} {current}")
                vocab_list.append(merged)
                known.add(merged)
            current = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return folder
