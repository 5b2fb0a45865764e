"""Pretrained encoder weights: loaded once at the server, refused at start if they do not fit."""

import pytest
import torch
from safetensors.torch import save_file

from shared_model.config import ConfigError, ModelConfig
from shared_model.model import FusionModel
from shared_model.weights import initial_model, shared_state

SMALL = dict(embed_dim=32, image_size=32, max_report_tokens=16, text_vocab_buckets=256)


def encoder_file(tmp_path, cfg, name="image_encoder", suffix=".pt", whole=False):
    torch.manual_seed(123)
    donor = FusionModel(cfg)
    state = donor.state_dict() if whole else getattr(donor, name).state_dict()
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path, getattr(donor, name).state_dict()


@pytest.mark.parametrize(("suffix", "whole"), [(".pt", False), (".safetensors", True)])
def test_weights_of_an_encoder_or_a_whole_model_load_into_the_initial_model(
    tmp_path, suffix, whole
):
    cfg = ModelConfig(**SMALL)
    path, expected = encoder_file(tmp_path, cfg, suffix=suffix, whole=whole)
    model = initial_model(ModelConfig(**SMALL, image_weights=str(path)), seed=0)
    for key, value in model.image_encoder.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    plain = initial_model(cfg, seed=0)  # the rest stays the seeded init
    torch.testing.assert_close(model.head[1].weight, plain.head[1].weight)


def test_missing_or_mismatched_weights_are_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.image-weights: .* does not exist"):
        initial_model(ModelConfig(**SMALL, image_weights=str(tmp_path / "none.pt")), seed=0)
    path, _ = encoder_file(tmp_path, ModelConfig(**SMALL))  # embed-dim 32
    with pytest.raises(ConfigError, match=r"does not fit .*wrong shape.*embed-dim"):
        initial_model(ModelConfig(**{**SMALL, "embed_dim": 64}, image_weights=str(path)), 0)
    text, _ = encoder_file(tmp_path, ModelConfig(**SMALL), name="text_encoder")
    with pytest.raises(ConfigError, match=r"model.image-weights: .*missing"):
        initial_model(ModelConfig(**SMALL, image_weights=str(text)), seed=0)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        initial_model(ModelConfig(**SMALL, image_weights=str(tmp_path / "junk.pt")), seed=0)
    with pytest.raises(ConfigError, match=r"model.text-weights: the model has no text_encoder"):
        initial_model(ModelConfig(**SMALL, branches="image", text_weights=str(text)), seed=0)


def test_frozen_encoders_get_no_update_and_are_not_sent():
    model = initial_model(ModelConfig(**SMALL, encoder_mode="frozen"), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("fusion.", "head.")) for n in trainable)
    assert set(shared_state(model)) == trainable
