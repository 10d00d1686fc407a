"""Do-no-harm routing: a step that leaves the routers' familiar region runs every block from there on."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen2

from layerroute import LayerRouteModel
from layerroute.evaluation import scored_steps
from layerroute.familiarity import familiarity_ignored, fit_context_roles, fit_familiarity
from layerroute.steps import TokenizedStep


def skipping_model() -> LayerRouteModel:
    """A tiny routed model whose routers skip blocks 1 and 3 for every step (bias only)."""
    model = LayerRouteModel.from_base(tiny_qwen2()).eval()
    with torch.no_grad():
        for index, router in enumerate(model.routers):
            router.proj.bias.fill_(-4.0 if index in (1, 3) else 4.0)
    return model


def steps(count: int, length: int = 8, seed: int = 0) -> list[TokenizedStep]:
    generator = torch.Generator().manual_seed(seed)
    return [TokenizedStep(torch.randint(2, 128, (length,), generator=generator).tolist(), [5, 6], "tool_call", str(i))
            for i in range(count)]


def skipped(model: LayerRouteModel, step: TokenizedStep) -> list[int]:
    model.generate(torch.tensor([step.context_ids]), max_new_tokens=1, do_sample=False)
    return model.last_route.skipped_layers


def test_unfitted_routers_count_every_step_as_familiar():
    model = skipping_model()
    assert model.config.familiarity_quantile is None
    assert all(skipped(model, step) == [1, 3] for step in steps(3))


def test_once_a_block_finds_the_step_unfamiliar_it_and_every_later_block_run():
    model = skipping_model()
    fit_familiarity(model, steps(6), pad_token_id=0, quantile=1.0)
    with torch.no_grad():
        for router, radius in zip(model.routers, (float("inf"), float("inf"), 0.0, float("inf"))):
            router.familiar_radius.fill_(radius)  # nothing is familiar to block 2's router, everything to the rest
    step = steps(1, seed=9)[0]
    assert skipped(model, step) == [1]  # block 1 skips while the step still looks familiar; 3 runs after block 2
    with familiarity_ignored(model):
        assert skipped(model, step) == [1, 3]
    assert skipped(model, step) == [1]  # the radius is back after the comparison


def test_the_fitted_radius_holds_the_quantile_of_the_fitted_steps():
    model = skipping_model()
    fitted = steps(40)
    radii = fit_familiarity(model, fitted, pad_token_id=0, quantile=0.75, batch_size=1)
    assert model.config.familiarity_quantile == 0.75
    assert radii.shape == (model.num_layers,) and torch.isfinite(radii).all()
    with torch.no_grad(), familiarity_ignored(model):  # as the fit read them
        features = model(torch.tensor([s.context_ids for s in fitted]), record_router_features=True).router_features
    for index, router in enumerate(model.routers):
        familiar = (router.distance(features[:, index]) <= router.familiar_radius).float().mean()
        assert 0.7 <= float(familiar) <= 0.8
    # steps unlike the fitted ones (other lengths, other tokens) leave the region
    strangers = [TokenizedStep([3] * 30, [5], "planning", "s")]
    assert skipped(model, strangers[0]) != [1, 3]


def test_familiar_regions_survive_save_and_load(tmp_path):
    model = skipping_model()
    radii = fit_familiarity(model, steps(6), pad_token_id=0, quantile=0.9)
    model.save_pretrained(tmp_path)
    loaded = LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2())
    assert loaded.config.familiarity_quantile == 0.9
    assert torch.equal(torch.stack([r.familiar_radius for r in loaded.routers]), radii.to(torch.float32))
    assert torch.equal(loaded.routers[2].feature_mean, model.routers[2].feature_mean)


def test_an_adapter_saved_without_familiar_regions_loads_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    model = skipping_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    old = {name: tensor for name, tensor in weights.items()
           if not name.endswith(("feature_mean", "feature_scale", "familiar_radius"))}
    save_file(old, tmp_path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="familiarity statistics"):
        loaded = LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2()).eval()
    assert skipped(loaded, steps(1)[0]) == [1, 3]


def test_bad_fits_are_refused():
    model = skipping_model()
    with pytest.raises(ValueError, match="familiarity_quantile must lie in"):
        fit_familiarity(model, steps(4), pad_token_id=0, quantile=0.0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        fit_familiarity(model, steps(1), pad_token_id=0, quantile=0.9)


def role_steps(counts: dict[tuple[str | None, str], int]) -> list[TokenizedStep]:
    return [TokenizedStep([3, 4, 5], [6], kind, f"{role}-{kind}-{i}", context_role=role)
            for (role, kind), count in counts.items() for i in range(count)]


def test_routers_decide_only_after_roles_whose_training_steps_hold_both_types():
    model = skipping_model()
    # after a tool result every training step is a call: the routers never learnt what else follows a tool result
    counts = fit_context_roles(model, role_steps({("user", "tool_call"): 3, ("user", "planning"): 2,
                                                  ("tool", "tool_call"): 5, (None, "planning"): 9}), min_steps=2)
    assert counts == {"user": {"tool_call": 3, "planning": 2}, "tool": {"tool_call": 5, "planning": 0}}
    assert model.config.routed_context_roles == ["user"]
    assert model.config.routes_after("user") and model.config.routes_after(None)
    assert not model.config.routes_after("tool") and not model.config.routes_after("assistant")  # never seen
    fit_context_roles(model, role_steps({("user", "tool_call"): 3, ("user", "planning"): 2}), min_steps=3)
    assert model.config.routed_context_roles == []


def test_a_step_after_a_role_the_routers_do_not_decide_after_runs_every_block(tmp_path):
    model = skipping_model()
    model.config.routed_context_roles = ["user"]
    after_user, after_tool = (TokenizedStep([3, 4, 5, 6], [7, 8], "planning", "t", context_role=role)
                              for role in ("user", "tool"))
    routed = scored_steps(model, [after_user, after_tool])
    assert [r["route"].skipped_layers for r in routed] == [[1, 3], []]
    assert scored_steps(model, [after_tool], forced_skip=(3,))[0]["route"].skipped_layers == [3]  # forced: as asked
    with familiarity_ignored(model):
        assert scored_steps(model, [after_tool])[0]["route"].skipped_layers == [1, 3]
    assert model.config.routed_context_roles == ["user"]  # back after the comparison
    model.save_pretrained(tmp_path)
    assert LayerRouteModel.from_pretrained(tmp_path, base_model=tiny_qwen2()).config.routed_context_roles == ["user"]
