"""A small transformers BertModel (seeded random weights) saved as a model folder, and token ids to calibrate and
evaluate it with, for CI's transformer gate: python .ci/tiny_bert.py OUTDIR -> OUTDIR/model, OUTDIR/tokens.npz."""

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

out = Path(sys.argv[1])
torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=64)
transformers.logging.disable_progress_bar()
transformers.BertModel(cfg).eval().save_pretrained(out / "model")
g = np.random.default_rng(0)


def split(n, length):
    mask = np.ones((n, length), np.int64)
    mask[::3, length // 2:] = 0   # every third sentence padded
    return g.integers(1, 200, (n, length)), mask


ids, mask = split(64, 16)
ids_t, mask_t = split(48, 24)   # longer than any calibration sentence
np.savez(out / "tokens.npz", input_ids_train=ids, attention_mask_train=mask, input_ids_test=ids_t,
         attention_mask_test=mask_t)
