"""One rank of tests/test_tensor_parallel.py::test_hogwild_under_tensor_parallelism: SmolLM2
sharded over 3 processes (its 3 kv heads, one per rank), two Hogwild! workers over one shared
cache; rank 0 writes the result to <out>."""
import json
import os
import sys

import torch

import kvloom
from kvloom import models
from kvloom.hf.compat import tensor_parallel_kwargs

PROBLEM = "List three fruits and three vegetables."


def run(model, tok):
    r = kvloom.hogwild.generate(model, tok, PROBLEM, workers=2, max_new_tokens=10)
    return {"workers": r.workers, "transcript": r.transcript, "tokens": r.tokens}


if __name__ == "__main__":
    torch.set_num_threads(1)
    model, tok = models.load(None, **tensor_parallel_kwargs())
    kvloom.enable(model)
    res = {"tp": kvloom.hf.arch.tensor_parallel_size(model), **run(model, tok)}
    if os.environ["RANK"] == "0":
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
