"""What the compile tests share: a model output's tensor, and the inductor-against-eager check."""

import copy

import torch


def output(result):
    """The tensor of a model's output (HF models return an object holding it)."""
    return result if isinstance(result, torch.Tensor) else result.last_hidden_state


def assert_inductor_matches_eager(eager: torch.nn.Module, x: torch.Tensor) -> None:
    """A deep copy of ``eager`` (in train mode) compiled by inductor, the default backend (Triton
    on CUDA, C++ on CPU), gives the same gradients after one backward pass (rtol 1e-3, atol
    1e-5: inductor reorders reductions) and the same eval-mode output (rtol 1e-4, atol 1e-5)."""
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    output(eager(x)).square().mean().backward()
    output(compiled(x)).square().mean().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
    eager.eval()
    compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(output(compiled(x)), output(eager(x)), rtol=1e-4, atol=1e-5)
