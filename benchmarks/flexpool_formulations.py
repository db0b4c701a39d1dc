"""Why FlexPool's weighted sum is an autograd.Function: forward + backward (gradients for the
input and the weights) of the candidate formulations against ``x.mean((2, 3))``, 1 thread,
interleaved rounds. A diagnostic with no target; what counts is the whole model
(``train_speed.py``).

    .venv/bin/python benchmarks/flexpool_formulations.py
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from flexsurgeon.layers.pools import flex_pool2d

SHAPES = [(16, 128, 28, 28), (16, 256, 14, 14), (16, 512, 28, 28), (16, 1024, 14, 14), (16, 2048, 7, 7),
          (128, 2048, 7, 7)]


def multiply_reduce(x, w):  # the train path before: autograd's multiply-reduce
    return (x.flatten(2) * w.flatten(1).softmax(-1)).sum(-1)


def einsum(x, w):
    return torch.einsum("bcp,cp->bc", x.flatten(2), w.flatten(1).softmax(-1))


def function(x, w):
    return flex_pool2d(x, w)


def mean(x, w):
    return x.mean((2, 3))


FORMS = {"mean": mean, "autograd multiply-reduce (before)": multiply_reduce, "einsum (autograd)": einsum,
         "autograd.Function (now)": function}


def main() -> None:
    torch.set_num_threads(1)
    print("| shape | " + " | ".join(FORMS) + " |")
    print("|---" * (len(FORMS) + 1) + "|")
    for shape in SHAPES:
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(shape[1:], requires_grad=True)
        g = torch.randn(shape[:2])
        calls = {k: (lambda f=f, x=x, w=w, g=g: torch.autograd.grad(f(x, w), (x, w) if f is not mean else (x,), g))
                 for k, f in FORMS.items()}
        for call in calls.values():
            for _ in range(3):
                call()
        times = {k: [] for k in calls}
        for r in range(15):
            for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                start = time.perf_counter()
                calls[k]()
                calls[k]()
                times[k].append((time.perf_counter() - start) / 2)
        med = statistics.median
        cells = [f"{med(v) * 1e3:.2f} ms ({med(a / b for a, b in zip(v, times['mean'])):.2f}x)" for v in times.values()]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
