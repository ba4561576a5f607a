"""Bad input: a clear error, and the parameters, state and step counters exactly as before."""

import copy
import math

import pytest
import torch

import fusedlr
from fusedlr import _ops
from fusedlr import schedules as S
from registry import OPTIMIZERS
from test_state_dict import assert_unchanged, snapshot, trained, trained_adam


@pytest.mark.parametrize("build,argument", [
    (lambda p: fusedlr.SGD(p, lr=-0.1), "lr"),
    (lambda p: fusedlr.SGD(p, lr=float("nan")), "lr"),
    (lambda p: fusedlr.SGD(p, momentum=-0.5), "momentum"),
    (lambda p: fusedlr.SGD(p, weight_decay=-1e-4), "weight_decay"),
    (lambda p: fusedlr.SGD(p, nesterov=True), "nesterov"),
    (lambda p: fusedlr.SGD(p, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (lambda p: fusedlr.Adam(p, lr=-1e-3), "lr"),
    (lambda p: fusedlr.Adam(p, betas=(1.0, 0.999)), "betas"),
    (lambda p: fusedlr.Adam(p, betas=(0.9, -0.1)), "betas"),
    (lambda p: fusedlr.Adam(p, betas=(0.9,)), "betas"),
    (lambda p: fusedlr.Adam(p, eps=-1e-8), "eps"),
    (lambda p: fusedlr.AdamW(p, weight_decay=-0.1), "weight_decay"),
    (lambda p: fusedlr.AdamW(p, amsgrad="yes"), "amsgrad"),
    (lambda p: fusedlr.AdamW(p, foreach=True), "foreach"),
    (lambda p: fusedlr.AdamW(p, differentiable=True), "differentiable"),
    (lambda p: fusedlr.AdamW(p, schedule=torch.optim.lr_scheduler.StepLR), "schedule"),
    (lambda p: fusedlr.AdamW([{"params": p, "lr": -1.0}]), "lr"),
    (lambda p: fusedlr.AdamW([{"params": p, "schedule": "cosine"}]), "schedule"),
    (lambda p: fusedlr.Lion(p, lr=-1e-4), "lr"),
    (lambda p: fusedlr.Lion(p, betas=(1.5, 0.99)), "betas"),
    (lambda p: fusedlr.Lion(p, betas=(0.9, math.nan)), "betas"),
    (lambda p: fusedlr.Lion(p, weight_decay=-0.1), "weight_decay"),
    (lambda p: fusedlr.Lion(p, maximize=1), "maximize"),
    (lambda p: fusedlr.Lion(p, max_grad_norm=0.0), "max_grad_norm"),
    (lambda p: fusedlr.Lion(p, foreach=True), "foreach"),
    # a group's key fusedlr would not read: an optimizer-wide setting, a torch flag it refuses
    (lambda p: fusedlr.AdamW([{"params": p, "master_weights": True}]), "master_weights"),
    (lambda p: fusedlr.AdamW([{"params": p, "max_grad_norm": 1.0}]), "max_grad_norm"),
    (lambda p: fusedlr.SGD([{"params": p, "skip_nonfinite": True}]), "skip_nonfinite"),
    (lambda p: fusedlr.Adam([{"params": p, "foreach": True}]), "foreach"),
    (lambda p: fusedlr.Lion([{"params": p, "differentiable": True}]), "differentiable"),
    (lambda p: fusedlr.SGD([{"params": p, "lr_scale": -1.0}], lr=0.1), "lr_scale"),
    (lambda p: fusedlr.SGD([{"params": p, "lr_scale": "a"}], lr=0.1), "lr_scale"),
])
def test_invalid_hyperparameters_raise_value_error_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build([torch.nn.Parameter(torch.zeros(3))])


def test_complex_parameters_are_refused():
    with pytest.raises(ValueError, match="complex"):
        fusedlr.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match="mixed devices"):
        fusedlr.Adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="cuda"))])


def test_mixed_devices_are_refused_meta():
    """Without a GPU: the meta device stands in for a second device."""
    with pytest.raises(ValueError, match="mixed devices"):
        fusedlr.Adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))])
    opt = fusedlr.Adam([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="mixed devices"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, device="meta"))]})
    assert len(opt.param_groups) == 1 and opt.schedule_steps().shape == (1,)


def assert_step_raises_and_changes_nothing(opt, params, message, errors=RuntimeError):
    """opt.step() raises `errors` matching `message`; params, state and counters are as before."""
    before = snapshot(opt, params)
    with pytest.raises(errors, match=message):
        opt.step()
    assert_unchanged(before, opt, params)


def bad_gradient_cases():
    # autograd itself refuses a .grad of another dtype, shape or device; test_ops checks the op's own checks
    yield "sparse", lambda p: torch.zeros_like(p).to_sparse(), "sparse|dense"
    yield "sparse-csr", lambda p: torch.zeros(1, p.numel()).to_sparse_csr().reshape(p.shape) if p.dim() == 2 \
        else torch.zeros_like(p).to_sparse(), "sparse|dense"


@pytest.mark.parametrize("name,make_grad,message", list(bad_gradient_cases()))
@pytest.mark.parametrize("fresh", [False, True], ids=["trained", "new-parameter"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_bad_gradient_raises_and_changes_nothing(name, make_grad, message, fresh, optimizer):
    params, opt = trained(optimizer)
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra]})
    all_params = params + [extra]
    for p in params:
        p.grad = torch.randn_like(p)
    target = extra if fresh else params[1]
    target.grad = make_grad(target)
    assert_step_raises_and_changes_nothing(opt, all_params, message, errors=(RuntimeError, ValueError, TypeError))
    # and once the gradient is fixed, training goes on
    target.grad = torch.randn_like(target)
    opt.step()
    assert int(opt.state[target]["step"]) == (1 if fresh else 4)


def test_observe_without_plateau_schedule_is_refused():
    opt = fusedlr.SGD([torch.nn.Parameter(torch.zeros(2))], schedule=S.StepLR(step_size=3))
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        opt.observe(1.0)


def test_observe_refuses_a_non_scalar_metric():
    opt = fusedlr.SGD([torch.nn.Parameter(torch.zeros(2))], schedule=S.ReduceLROnPlateau())
    with pytest.raises(ValueError, match="metric"):
        opt.observe(torch.ones(3))
    with pytest.raises(ValueError, match="metric"):
        opt.observe("0.5")
    opt.observe(float("inf"))  # as torch: a diverged metric is one more bad epoch, not an error
    assert float(opt.last_lr()[0]) == 1e-3


@pytest.mark.parametrize("change", ["dtype", "shape", "transposed"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_parameter_changed_under_its_state_raises_and_changes_nothing(change, optimizer):
    """A parameter given new data of another dtype or layout (p.data = ...) no longer fits the state
    its optimizer made for it: a clear error, nothing changed."""
    params, opt = trained(optimizer)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the step plan exists
    target = params[0]
    new = {"dtype": lambda t: t.double(), "shape": lambda t: t.reshape(-1),
           "transposed": lambda t: t.t().contiguous().t()}[change](target.detach().clone())
    target.data = new
    target.grad = torch.randn_like(target)
    params[1].grad = torch.randn_like(params[1])
    assert_step_raises_and_changes_nothing(opt, params, "parameter 0")


def test_parameter_given_new_data_of_the_same_layout_is_updated():
    """p.data = new tensor of the same dtype and layout: the step updates the new data."""
    params, opt = trained_adam()
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    fresh = torch.zeros_like(params[0])
    params[0].data = fresh
    opt.step()
    assert int(opt.state[params[0]]["step"]) == 5 and bool((fresh != 0).all())


def test_state_moved_in_place_is_followed():
    """share_memory_() moves a state tensor's memory: the next step updates it where it now is, as
    a torch optimizer would."""
    params, opt = trained_adam()
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    ref = fusedlr.AdamW(ref_params, lr=0.01, schedule=S.StepLR(step_size=2))
    ref.load_state_dict(opt.state_dict())
    for p in params:
        opt.state[p]["exp_avg"].share_memory_()
    for _ in range(2):
        for p, q in zip(params, ref_params):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])


def test_state_resized_in_place_raises_and_changes_nothing():
    params, opt = trained_adam()
    opt.state[params[1]]["exp_avg_sq"].resize_(1 << 16).zero_()  # a new allocation
    for p in params:
        p.grad = torch.randn_like(p)
    assert_step_raises_and_changes_nothing(opt, params, "exp_avg_sq of parameter 1")


def test_frozen_parameter_with_unfit_state_does_not_stop_the_others():
    """The state of a parameter without a gradient is not checked (the op skips it too)."""
    params, opt = trained_adam()
    params[1].data = params[1].data.double()  # its state no longer fits; it has no gradient
    params[1].grad = None
    params[0].grad = torch.randn_like(params[0])
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])  # a new plan is built
    opt.step()
    assert int(opt.state[params[0]]["step"]) == 4 and int(opt.state[params[1]]["step"]) == 3


def test_many_parameters_first_bad_gradient_is_reported_and_nothing_changes():
    """Past 512 parameters the step gathers them on all threads: the error is still the first
    parameter's that fails, and nothing changes."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(1200)]
    opt = fusedlr.AdamW(params, lr=0.01)
    for p in params:
        p.grad = torch.randn(3)
    opt.step()
    for p in params:
        p.grad = torch.randn(3)
    for bad in (1100, 700):
        params[bad].grad = torch.zeros(3).to_sparse()
    assert_step_raises_and_changes_nothing(opt, params, "parameter 700 is sparse")


def fits_storage(t):
    """Whether every element of t lies inside its storage."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return (t.storage_offset() + extent) * t.element_size() <= t.untyped_storage().nbytes()


def test_state_storage_shrunk_in_place_raises_and_changes_nothing():
    """A state storage made smaller in place (its allocation may even stay where it was) is checked
    again and refused, where writing the state would run past its storage."""
    params, opt = trained_adam()
    opt.state[params[0]]["exp_avg"].untyped_storage().resize_(8)
    for p in params:
        p.grad = torch.randn_like(p)
    # what can still be read: the exp_avg of every parameter shares the shrunk storage (packed state)
    readable = [params[0].detach(), params[1].detach()] + [
        t for p in params for t in opt.state[p].values() if fits_storage(t)]
    assert len(readable) == 2 + 2 * len(params)  # exp_avg_sq and step of each
    before = [t.clone() for t in readable]
    with pytest.raises(RuntimeError, match="exp_avg of parameter 0 lies outside its storage"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, readable))
    assert int(opt.state[params[0]]["step"]) == 3 and opt.schedule_steps().tolist() == [3]


def test_meta_tensors_are_refused():
    """A meta parameter has no data: refused when it joins an optimizer; a meta tensor handed to the
    op among real ones raises and changes nothing."""
    with pytest.raises(ValueError, match="meta parameter"):
        fusedlr.AdamW([torch.nn.Parameter(torch.ones(3, device="meta"))])
    param, state, step = torch.ones(3), torch.zeros(3), torch.zeros((), dtype=torch.int64)
    for meta_arg in ("param", "grad"):
        args = dict(param=param, grad=torch.ones(3))
        args[meta_arg] = torch.ones(3, device="meta")
        with pytest.raises(RuntimeError, match="meta"):
            _ops.step_("adam", [args["param"]], [args["grad"]],
                       [[state], [state.clone()], [torch.empty(0)], [torch.empty(0)]], [step], [0],
                       [0.1, 0.9, 0.999, 1e-8, 0, 0, 0, 1], [1.0, 0.0, 1.0], torch.zeros(1, dtype=torch.int64),
                       _ops.initial_plateau_state(1, "cpu"))
    assert torch.equal(param, torch.ones(3)) and torch.equal(state, torch.zeros(3)) and int(step) == 0


def test_a_group_may_repeat_the_optimizers_own_settings():
    """A wrapper such as torch's ZeroRedundancyOptimizer passes its constructor's arguments in
    each group: the optimizer's own values are read by the optimizer, so nothing goes unread."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = fusedlr.AdamW([{"params": [p], "max_grad_norm": 1, "skip_nonfinite": True, "master_weights": False,
                          "partition_group": None}], max_grad_norm=1.0, skip_nonfinite=True)
    assert opt.max_grad_norm == 1.0 and opt.skip_nonfinite
    with pytest.raises(ValueError, match="max_grad_norm=2.0, where the AdamW has 1.0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "max_grad_norm": 2.0})
    assert len(opt.param_groups) == 1


def test_a_group_that_fails_to_join_leaves_the_optimizer_as_it_was():
    """add_param_group checks a group whole before it joins: a bad one leaves no trace."""
    params, opt = trained()
    before = snapshot(opt, params)
    for bad in ({"lr_scale": -2.0}, {"initial_lr": math.nan}, {"lr": -1.0}):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], **bad})
        assert len(opt.param_groups) == 1 and opt.schedule_steps().numel() == 1
        assert_unchanged(before, opt, params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # and it goes on stepping
    assert opt.schedule_steps().tolist() == [4]


def test_a_parameter_listed_twice_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="twice"):
        fusedlr.AdamW([p, p])  # torch's own warning, then fusedlr's error


def test_groups_added_in_place_are_refused_naming_add_param_group():
    params, opt = trained()
    before = snapshot(opt, params)
    q = torch.nn.Parameter(torch.randn(4))
    q.grad = torch.randn(4)
    opt.param_groups.append({**opt.defaults, "params": [q]})
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.step()
    opt.param_groups.pop()
    assert_unchanged(before, opt, params)
    assert q.grad is not None and q not in opt.state


def test_an_lr_scale_without_a_schedule_warns_and_runs_at_the_lr_as_torch():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="lr_scale"):
        opt = fusedlr.SGD([{"params": [p], "lr_scale": 0.5}], lr=0.1)
    ref = torch.optim.SGD([{"params": [q], "lr_scale": 0.5}], lr=0.1)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step()
    ref.step()
    assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize("grad", [lambda: torch.randn(1).expand(4, 3), lambda: torch.randn(3).expand(4, 3),
                                  lambda: torch.randn(4, 1).expand(4, 3), lambda: torch.randn(3, 8)[:, ::2].t()])
def test_a_broadcast_or_strided_gradient_steps_as_torch(grad):
    """A gradient of stride 0 (expand) has fewer elements in its storage than it has: it is read,
    not refused as lying outside its storage."""
    p, q = torch.nn.Parameter(torch.randn(4, 3)), None
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = fusedlr.AdamW([p], lr=0.1), torch.optim.AdamW([q], lr=0.1, foreach=False)
    for _ in range(3):
        g = grad()
        p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def _set(path, value):
    def mutate(state_dict):
        state_dict = copy.deepcopy(state_dict)  # its state's dicts are the optimizer's own, as in torch
        target = state_dict
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return state_dict
    return mutate


@pytest.mark.parametrize("mutate,error,message", [
    (lambda sd: [1, 2], TypeError, "state_dict"),
    (lambda sd: {"state": sd["state"]}, TypeError, "param_groups"),
    (lambda sd: {"state": [], "param_groups": sd["param_groups"]}, TypeError, "state"),
    (_set(("state", 0, "step"), torch.tensor(2.0 ** 63)), ValueError, "invalid step"),
    (_set(("state", 0, "step"), 1e30), ValueError, "invalid step"),
    (_set(("param_groups", 0, "schedule_step"), 2 ** 64), ValueError, "schedule_step"),
    (_set(("param_groups", 0, "schedule"), "StepLR"), ValueError, "schedule of type str"),
])
def test_a_malformed_state_dict_raises_naming_what_and_changes_nothing(mutate, error, message):
    params, opt = trained()
    before = snapshot(opt, params)
    with pytest.raises(error, match=message):
        opt.load_state_dict(mutate(opt.state_dict()))
    assert_unchanged(before, opt, params)


@pytest.mark.parametrize("steps", [1.5, 2 ** 63, -1, [1, 2], "a"])
def test_set_schedule_steps_refuses_what_is_no_step_count(steps):
    params, opt = trained()
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="steps must be an integer"):
        opt.set_schedule_steps(steps)
    assert_unchanged(before, opt, params)


def test_from_hf_warmup_stable_decay_names_the_steps_that_do_not_fit():
    with pytest.raises(ValueError, match=r"num_warmup_steps \(1\) and num_decay_steps \(20\) exceed"):
        S.from_hf("warmup_stable_decay", 1, 10, num_decay_steps=20)
