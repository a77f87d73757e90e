"""Adapter configs that PEFT loads in ways the server must follow exactly, or refuse with the reason."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from server.adapters.store import AdapterStore
from server.demo.tiny import save_adapter
from server.engine.runner import ModelRunner
from server.errors import AdapterInvalid
from tests.conftest import ATOL, private_model
from tests.reference import reference_logits

IDS = [40, 41, 42, 43, 44, 45, 46, 47, 48]


def _registry(model_dir, store):
    model, registry = private_model(model_dir, AdapterStore(store))
    return ModelRunner(model, registry.context), registry


@pytest.mark.parametrize("init", ["olora", "pissa", "pissa_niter_4", "corda", "loftq", "lora_ga"])
def test_inits_that_rewrite_the_base_weights_are_refused_with_the_way_out(llama, tmp_path, init):
    """PEFT re-runs these initialisations on load and subtracts the initial adapter from the base weight, so they
    are not plain LoRA; PEFT converts them to plain LoRA on saving with path_initial_model_for_weight_conversion."""
    adapter = tmp_path / init
    save_adapter(llama.model_dir, LoraConfig(r=2, target_modules=["q_proj"]), adapter, seed=1, base_name="x")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    _, registry = _registry(llama.model_dir, tmp_path)
    with pytest.raises(AdapterInvalid, match="path_initial_model_for_weight_conversion"):
        registry.load_blocking([init])


def test_all_linear_with_exclusions_equals_the_reference(llama, tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj", "q_proj"], init_lora_weights=False
    )
    save_adapter(llama.model_dir, config, tmp_path / "some-linear", seed=3, base_name="x", scale=0.3)
    saved = load_file(tmp_path / "some-linear" / "adapter_model.safetensors")
    assert saved and not any("down_proj" in k or "q_proj" in k for k in saved)
    runner, registry = _registry(llama.model_dir, tmp_path)
    adapters = registry.load_blocking(["some-linear"])
    assert set(adapters[0].built.layers) == {k.removeprefix("base_model.model.").split(".lora_")[0] for k in saved}
    ours = runner.score(torch.tensor([IDS]), [(adapters[0].slot,)])[0].cpu()
    torch.testing.assert_close(
        ours, reference_logits(llama.model_dir, tmp_path, ["some-linear"], IDS), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize(
    "damage, reason",
    [("duplicate", "more than once"), ("too-many", "r=50 asks for 9600 entries; the 64x128 weight has 8192")],
)
def test_shira_indices_peft_would_refuse_are_refused(llama, tmp_path, damage, reason):
    source = llama.store / "shira"
    target = tmp_path / "shira"
    target.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.0.self_attn.q_proj" in k and k.endswith("shira_indices"))
    if damage == "duplicate":
        tensors[key][:, 1] = tensors[key][:, 0]
    else:
        config["r"] = 50  # r * (in + out) entries: more than any targeted layer has
    (target / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, target / "adapter_model.safetensors")
    _, registry = _registry(llama.model_dir, tmp_path)
    with pytest.raises(AdapterInvalid, match=reason):
        registry.load_blocking(["shira"])


def test_an_adapters_bytes_count_each_tensor_once(llama):
    """What the memory budget counts: the weights served, each once (LoRA's low_rank holds the same tensors)."""
    _, registry = _registry(llama.model_dir, llama.store)
    adapter = registry.load_blocking(["lora"])[0]
    saved = load_file(llama.store / "lora" / "adapter_model.safetensors")
    assert adapter.nbytes == sum(t.numel() * 4 for t in saved.values())
