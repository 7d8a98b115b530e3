import pytest
from PIL import Image, ImageDraw

from training.data.vqa import CLOTHES_QUESTION, ColorAnswerer, color_name, normalise_answer


@pytest.mark.parametrize("rgb, name", [
    ((200, 40, 50), "red"), ((40, 80, 190), "blue"), ((40, 140, 60), "green"), ((240, 200, 40), "yellow"),
    ((240, 130, 180), "pink"), ((120, 60, 160), "purple"), ((245, 245, 245), "white"), ((20, 20, 25), "black"),
    ((130, 130, 135), "grey"), ((120, 80, 40), "brown"), ((240, 130, 30), "orange"), ((255, 226, 204), None),
    ((150, 30, 37), "red"),  # a shaded red stays red
])
def test_palette_names(rgb, name):
    assert color_name(*rgb) == name


def test_normalised_answers_keep_the_order():
    assert normalise_answer(" Red and  WHITE. ") == "red and white"
    assert normalise_answer("white and red") != normalise_answer("red and white")


def clothes(main, second, hair=None):
    img = Image.new("RGBA", (40, 60), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, 39, 39], fill=main + (255,))
    d.rectangle([0, 40, 39, 54], fill=second + (255,))
    d.rectangle([0, 55, 39, 56], fill=(10, 10, 10, 255))  # an outline: thin black is not a garment
    if hair:
        d.rectangle([30, 0, 39, 59], fill=hair + (255,))
    return img


def test_two_dominant_colours_most_covered_first():
    a = ColorAnswerer()
    assert a.answer(clothes((200, 40, 50), (245, 245, 245)), [CLOTHES_QUESTION]) == ["red and white"]
    assert a.answer(clothes((245, 245, 245), (200, 40, 50)), [CLOTHES_QUESTION]) == ["white and red"]
    assert a.answer(None, [CLOTHES_QUESTION, CLOTHES_QUESTION]) == ["unknown", "unknown"]
    three = a.answer(clothes((200, 40, 50), (245, 245, 245), hair=(40, 80, 190)),
                     ["List top three colors of the character's clothes"])
    assert three == ["red, blue and white"]


def test_hair_below_the_head_is_not_clothes():
    face = Image.new("RGBA", (20, 20), (255, 226, 204, 255))
    ImageDraw.Draw(face).rectangle([0, 0, 19, 7], fill=(40, 80, 190, 255))  # blue hair on top
    pic = clothes((200, 40, 50), (245, 245, 245), hair=(40, 80, 190))
    assert ColorAnswerer().answer(pic, [CLOTHES_QUESTION])[0].startswith("red and blue")
    assert ColorAnswerer().answer(pic, [CLOTHES_QUESTION], face=face) == ["red and white"]


def test_instructblip_loading_path_with_a_tiny_random_model(tmp_path):
    """The InstructBLIP backend loads a folder as it would the paper's Salesforce/instructblip-vicuna-7b."""
    from transformers import (BertTokenizer, BlipImageProcessor, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor, LlamaConfig)

    from pipelines.components import char_tokenizer
    from training.data.vqa import InstructBlipAnswerer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz'"]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tok = char_tokenizer(tmp_path / "tok")
    processor = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                                      tokenizer=tok, qformer_tokenizer=BertTokenizer(str(tmp_path / "vocab.txt")),
                                      num_query_tokens=4)  # adds the <image> token to the tokenizer
    config = InstructBlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"vocab_size": len(words), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                        "intermediate_size": 37, "encoder_hidden_size": 32},
        text_config=LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).to_dict(),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    InstructBlipForConditionalGeneration(config).save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")
    answerer = InstructBlipAnswerer.from_pretrained(str(tmp_path / "blip"), max_new_tokens=3)
    answers = answerer.answer(Image.new("RGB", (50, 40), "red"), [CLOTHES_QUESTION, "what is she wearing"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
