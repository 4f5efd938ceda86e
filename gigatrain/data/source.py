"""The token data a run trains on: the prepared folder of data.path, or the default corpus,
prepared into the cache on first use."""

from __future__ import annotations

from pathlib import Path

import torch

from gigatrain.config import Config, ConfigError
from gigatrain.data import DataError
from gigatrain.data.loader import TokenData
from gigatrain.data.prepare import ensure_default_data
from gigatrain.paths import cache_dir
from gigatrain.ranks import is_main_process


def open_data(cfg: Config) -> TokenData:
    if cfg.data.path:
        return TokenData(Path(cfg.data.path), verify=cfg.data.verify)
    folder = ensure_default_data(cache_dir() / "data", tokenizer=cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)
    return TokenData(folder, verify=cfg.data.verify)


def open_data_once(cfg: Config) -> TokenData:
    """Rank 0 opens (and on first use prepares) the data before the others, so that ranks
    do not race to prepare the same default corpus; if the data is bad, every rank stops
    with rank 0's message rather than waiting for it."""
    if not torch.distributed.is_initialized():
        return open_data(cfg)
    data, outcome = None, [None]
    if is_main_process():
        try:
            data = open_data(cfg)
        except (DataError, ConfigError) as err:
            outcome = [(type(err) is DataError, str(err))]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        is_data_error, message = outcome[0]
        raise (DataError if is_data_error else ConfigError)(message)
    return data if data is not None else open_data(cfg)
