import pytest
import torch
from torch.nn import functional as F

from streamvi.merging.optim import RowSparseAdam


def _run(opt_cls, steps, *, lr=1e-2, maximize=False, seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(50, 2))
    opt = opt_cls([w], lr=lr, betas=(0.9, 0.999), eps=1e-7, maximize=maximize)
    touched = torch.zeros(50, dtype=torch.bool)
    for s in range(steps):
        g = torch.Generator().manual_seed(100 + s)
        # duplicates in the lookup: the gradient is uncoalesced, as the model's is
        ids = torch.randint(0, 40, (30,), generator=g)
        target = torch.randn(30, 2, generator=g)
        opt.zero_grad(set_to_none=True)
        ((F.embedding(ids, w, sparse=True) - target) ** 2).sum().backward()
        opt.step()
        touched[ids] = True
    return w.detach(), opt, touched


@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_sparse_adam(maximize):
    ours, opt, touched = _run(RowSparseAdam, 25, maximize=maximize)
    ref, ref_opt, _ = _run(torch.optim.SparseAdam, 25, maximize=maximize)
    # the same arithmetic in the same order: equal bit for bit
    assert torch.equal(ours, ref)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[opt.param_groups[0]["params"][0]][key],
                           ref_opt.state[ref_opt.param_groups[0]["params"][0]][key])
    # rows 40..49 never appear in a batch: bit-identical to their initial values
    torch.manual_seed(0)
    initial = torch.randn(50, 2)
    assert not touched[40:].any()
    assert torch.equal(ours[40:], initial[40:])
    assert not torch.equal(ours[:40], initial[:40])


def test_state_loads_into_torch_sparse_adam_and_back():
    w, opt, _ = _run(RowSparseAdam, 5)
    ref = torch.optim.SparseAdam([torch.nn.Parameter(w.clone())], lr=1e-2, eps=1e-7)
    ref.load_state_dict(opt.state_dict())
    back = RowSparseAdam([torch.nn.Parameter(w.clone())], lr=1e-2, eps=1e-7)
    back.load_state_dict(ref.state_dict())
    assert back.state_dict()["state"][0]["step"] == 5


def test_dense_gradient_is_refused():
    w = torch.nn.Parameter(torch.zeros(3, 2))
    opt = RowSparseAdam([w])
    w.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="gradients sparse along the first"):
        opt.step()


@pytest.mark.parametrize("maximize", [False, True])
def test_masked_step_on_dense_gradients_matches_row_step(maximize):
    torch.manual_seed(0)
    init = torch.randn(50, 2)
    rows_w = torch.nn.Parameter(init.clone())
    dense_w = torch.nn.Parameter(init.clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-7, maximize=maximize)
    rows_opt, dense_opt = RowSparseAdam([rows_w], **kw), RowSparseAdam([dense_w], **kw)
    for s in range(25):
        g = torch.Generator().manual_seed(100 + s)
        ids = torch.randint(0, 40, (30,), generator=g)
        target = torch.randn(30, 2, generator=g)
        rows_opt.zero_grad(set_to_none=True)
        ((F.embedding(ids, rows_w, sparse=True) - target) ** 2).sum().backward()
        rows_w.grad = rows_w.grad.coalesce()
        # the same gradient, dense, with the mask of the rows looked up
        dense_w.grad = rows_w.grad.to_dense()
        touched = torch.zeros(50, dtype=torch.bool)
        touched[ids] = True
        rows_opt.step()
        dense_opt.masked_step(touched)
    assert torch.equal(dense_w.detach(), rows_w.detach())
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(dense_opt.state[dense_w][key], rows_opt.state[rows_w][key])
    assert dense_opt.state[dense_w]["step"] == 25
    assert torch.equal(dense_w.detach()[40:], init[40:])
    assert not torch.equal(dense_w.detach()[:40], init[:40])


def test_masked_step_refuses_sparse_gradients():
    w = torch.nn.Parameter(torch.randn(5, 2))
    F.embedding(torch.tensor([1, 2]), w, sparse=True).sum().backward()
    with pytest.raises(RuntimeError, match="dense gradient"):
        RowSparseAdam([w]).masked_step(torch.ones(5, dtype=torch.bool))
