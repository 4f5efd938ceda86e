"""Pipeline stages of a model with tied embeddings, in one process (no process group needed)."""

from dataclasses import replace

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from gigatrain.models.presets import get_preset
from gigatrain.models.transformer import Transformer
from gigatrain.parallel.pipeline import stage_module


def test_tied_weight_has_one_name_on_every_stage_and_the_stages_compose_to_the_model():
    """The first stage embeds with the tied weight and the last stage's head projects with
    it: each holds a copy, named as one process names it, so checkpoints and optimizer state
    line up under any layout."""
    model = Transformer(replace(get_preset("tiny"), n_layers=4))
    first, last = (stage_module(model, stage, 2, keep_original=False) for stage in (0, 1))
    assert last.output.weight is last.tok_embeddings.weight
    # The optimizer keys a parameter by its first name: the embeddings', as in one process.
    names = [name for part in (model, first, last) for name, _ in part.named_parameters()]
    assert "output.weight" not in names and names.count("tok_embeddings.weight") == 3
    # Together the stages save exactly what one process saves.
    assert set(get_model_state_dict(first)) | set(get_model_state_dict(last)) == set(get_model_state_dict(model))
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens)), model(tokens), rtol=0, atol=0)
