"""The towers: shapes, unit features, the logit-scale clamp, end-token pooling, and
hand-over with save_pretrained / from_pretrained."""

import math

import pytest
import torch
from transformers import CLIPModel as HFCLIPModel

from megabatch.data_pipeline.read.tokenizer import CaptionTokenizer
from megabatch.trainer.models.clip import CLIP_PRESETS, ClipModel, clip_config
from megabatch.trainer.models.simclr import SimCLRModel

CONTEXT = 12


@pytest.fixture(scope="module")
def tokenizer():
    captions = [f"a photo of the digit {w}" for w in ["one", "two", "three", "four"]] * 5
    return CaptionTokenizer.train(captions, vocab_size=300, context_length=CONTEXT)


def _tiny_clip(tokenizer, **kw):
    config = clip_config(
        "tiny", image_size=32, context_length=CONTEXT, vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id, sot_id=tokenizer.sot_id, eot_id=tokenizer.eot_id, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return ClipModel(config).eval()


def test_clip_forward_gives_unit_features_and_initial_scale(tokenizer):
    model = _tiny_clip(tokenizer)
    tokens, mask = tokenizer(["a photo of the digit one", "two"])
    img, txt, scale = model(torch.randn(2, 3, 32, 32), tokens, mask)
    assert img.shape == txt.shape == (2, CLIP_PRESETS["tiny"].embed_dim)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    assert scale.requires_grad


def test_logit_scale_is_clamped_at_100(tokenizer):
    model = _tiny_clip(tokenizer)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(500.0))
    assert model.logit_scale().item() == pytest.approx(100.0)
    assert model.logit_scale().shape == ()


def test_text_feature_is_read_at_the_end_token(tokenizer):
    model = _tiny_clip(tokenizer)
    tokens, mask = tokenizer(["a photo of the digit one"])
    end = int((tokens[0] == tokenizer.eot_id).nonzero()[0])
    base = model.encode_text(tokens, mask)
    after = tokens.clone()
    after[0, end + 1 :] = 5  # tokens after the end token cannot matter (causal attention)
    torch.testing.assert_close(model.encode_text(after, mask), base)
    before = tokens.clone()
    before[0, end - 1] = 7  # a token before it does
    assert not torch.allclose(model.encode_text(before, mask), base)


def test_towers_hand_over_with_save_pretrained(tokenizer, tmp_path):
    model = _tiny_clip(tokenizer)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(42.0))
    model.sync_logit_scale()
    model.clip.save_pretrained(tmp_path)
    loaded = HFCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.logit_scale.exp().item() == pytest.approx(42.0)
    images = torch.randn(2, 3, 32, 32)
    got = loaded.get_image_features(pixel_values=images).pooler_output
    want = model.clip.get_image_features(pixel_values=images).pooler_output
    torch.testing.assert_close(got, want)


def test_bad_sizes_are_named(tokenizer):
    with pytest.raises(ValueError, match="model.preset must be one of"):
        clip_config("huge", image_size=32, context_length=CONTEXT, vocab_size=300, pad_id=0,
                    sot_id=2, eot_id=1)  # fmt: skip
    with pytest.raises(ValueError, match="not a multiple of the tiny patch size 4"):
        clip_config("tiny", image_size=30, context_length=CONTEXT, vocab_size=300, pad_id=0,
                    sot_id=2, eot_id=1)  # fmt: skip
    with pytest.raises(ValueError, match="for SimCLR"):
        SimCLRModel("vit-b-32", image_size=32)


@pytest.mark.parametrize("preset,width", [("tiny-resnet", 256), ("vit-small", 384)])
def test_simclr_encoder_and_head(preset, width):
    torch.manual_seed(0)
    model = SimCLRModel(preset, image_size=32, embed_dim=64).eval()
    h, z = model(torch.randn(3, 3, 32, 32))
    assert h.shape == (3, width) and z.shape == (3, 64)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    # The head is used for the loss only; the kept encoder gives h alone.
    torch.testing.assert_close(
        model.features(torch.zeros(1, 3, 32, 32)).shape, torch.Size([1, width])
    )
