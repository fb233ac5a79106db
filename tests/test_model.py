"""The model owns its embeddings: the engine's incremental image encoding gives the prompt embeddings of
`DeepseekVL2.embed_inputs`, through the model's own layout and merge."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsvl2.checkpoint import load_model
from dsvl2.engine.generate import Engine, Request
from dsvl2.engine.sampling import SamplingParams
from dsvl2.processor import Processor
from tests.conformance_data import conformance_dir

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingModel:
    """The real model, keeping the embeddings of every prefill block it is given."""

    def __init__(self, model) -> None:
        self._model, self.prefills = model, []

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def eval(self):
        return self

    def decode_step(self, embeds, positions, cache, slots, absorbed=None, last_only=True):
        if absorbed is False:
            self.prefills.append(embeds[0].clone())
        return self._model.decode_step(embeds, positions, cache, slots, absorbed, last_only)


@pytest.mark.parametrize("global_view_pos", ["head", "tail"])
def test_engine_prompt_embeddings_are_the_models(conf_dir, global_view_pos: str) -> None:
    model = load_model(conf_dir / "tiny_like")
    model.cfg = dataclasses.replace(model.cfg, global_view_pos=global_view_pos)
    processor = Processor.from_pretrained(conf_dir / "tiny_like")
    images = [conformance_dir() / "images" / "wide.png", conformance_dir() / "images" / "square.png"]
    conversation = [{"role": "user", "content": "<image>\n<image>\nCompare them."}]
    recording = RecordingModel(model)
    engine = Engine(recording, processor, max_batch=1, vision_tiles_per_step=1, prefill_chunk=100)
    engine.generate(Request(conversation, images, SamplingParams(max_new_tokens=1)))
    batch = processor.batch([processor.encode(conversation, images)])
    with torch.inference_mode():
        expected = model.embed_inputs(batch.input_ids, batch.images, batch.images_seq_mask,
                                      batch.images_spatial_crop)[0]
    assert len(recording.prefills) > 1  # chunked: the prompt crossed several prefill blocks
    torch.testing.assert_close(torch.cat(recording.prefills), expected, rtol=1e-5, atol=1e-5)


def test_image_embeddings_must_fill_the_image_tokens(conf_dir) -> None:
    model = load_model(conf_dir / "tiny_like")
    mask = torch.tensor([[False, True, True, False]])
    one_token = [torch.zeros(1, model.cfg.language.hidden_size)]
    with pytest.raises(ValueError, match="2 image-token positions but the images give 1 embeddings"):
        model.embed_with_images(torch.tensor([[1, 2, 3, 4]]), mask, one_token)


def test_logits_mask_keeps_only_the_selected_positions(conf_dir) -> None:
    model = load_model(conf_dir / "tiny_like", dtype=torch.float32).eval()
    input_ids = torch.randint(10, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    keep = torch.zeros_like(input_ids, dtype=torch.bool)
    keep[0, [2, 5]] = True
    keep[1, 8] = True
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        some = model(input_ids, attention_mask=attention_mask, logits_mask=keep).logits
    assert some.shape == (3, full.shape[-1])
    torch.testing.assert_close(some, full[keep], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_mask"):
        model(input_ids, labels=input_ids, logits_mask=keep)
