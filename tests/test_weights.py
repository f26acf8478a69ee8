"""The weights pushed to an engine are the trained policy: peft's own ``merge_and_unload()`` of the trained model for
every adapter type peft can merge, or a one-line refusal; the live model is never touched by a push."""

from __future__ import annotations

import copy
import inspect
import re
import sys
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from peft.utils.other import ModulesToSaveWrapper  # noqa: E402

from trl_stepwise.engines.weights import check_servable_model, check_servable_peft, policy_weights  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_model(base: torch.nn.Module, config, *more: tuple[str, object]) -> torch.nn.Module:
    """``base`` wrapped in ``config`` (plus named extra adapters), every adapter tensor moved off its init."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
        for name, extra in more:
            model.add_adapter(name, extra)
    _perturb(model)
    return model.eval()


def _perturb(model: torch.nn.Module) -> None:
    """randn * 0.05 on every trainable tensor and every tensor of any adapter (modules_to_save copies, DoRA
    magnitudes, biases, inactive adapters): a tensor the push forgot or mixed up then shows."""
    adapter = re.compile(r"\.(" + "|".join(map(re.escape, model.peft_config)) + r")(\.|$)")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad or adapter.search(name):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def _pushed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with policy_weights(model) as weights:
        assert inspect.isgenerator(weights) or not hasattr(model, "get_base_model")  # streamed, not a second model
        return dict(weights)


def _assert_pushes_merge_and_unload(model: torch.nn.Module, adapter_names: list[str] | None = None) -> float:
    """The push equals ``merge_and_unload()`` (same keys, same values), leaves the live model bit-identical, and the
    pushed weights compute what the peft model computes. Returns the largest difference to merge_and_unload."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(model).merge_and_unload(adapter_names=adapter_names)
    expected = merged.state_dict()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pushed = _pushed(model)
    assert sorted(pushed) == sorted(expected)
    worst = max((pushed[name] - tensor).abs().max().item() for name, tensor in expected.items())
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-5, msg=name)
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], before[name]) for name in before), "a push changed the live model"
    return worst


def _assert_same_policy(model: torch.nn.Module, pushed: dict[str, torch.Tensor]) -> None:
    """A plain base model holding the pushed weights gives the peft model's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = copy.deepcopy(model).unload()
    plain.load_state_dict(pushed)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def _one_line_refusal(call, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def _refused_push(model: torch.nn.Module, match: str) -> str:
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    message = _one_line_refusal(lambda: _pushed(model), match)
    _one_line_refusal(lambda: check_servable_model(model), match)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    return message


# every norm layer of a Llama-shaped model: peft < 0.22 matched any module name ending in "norm", peft 0.22 matches
# whole names ("norm" is then the final norm alone), so the three kinds are named
EVERY_NORM = ["input_layernorm", "post_attention_layernorm", "norm"]

LORA_SETUPS = {
    "lora": dict(target_modules=TARGETS),
    "rslora": dict(target_modules=TARGETS, use_rslora=True, lora_alpha=32),
    "dora": dict(target_modules=TARGETS, use_dora=True),
    "modules_to_save_lm_head": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "modules_to_save_norm": dict(target_modules=["q_proj", "v_proj"], modules_to_save=EVERY_NORM),
    "embed_tokens_target": dict(target_modules=["embed_tokens", "q_proj", "v_proj"]),
    "dora_with_embed_tokens": dict(target_modules=["embed_tokens", "q_proj"], use_dora=True),
    "trainable_tokens": dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]),
}


@pytest.mark.parametrize("setup", list(LORA_SETUPS))
def test_lora_set_ups_push_merge_and_unload(make_tiny_model, setup):
    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, **LORA_SETUPS[setup]))
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


def test_modules_to_save_sends_the_trained_copy_under_the_original_name(make_tiny_model):
    """Every norm layer is sent as its trained copy, none as the frozen original."""
    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=EVERY_NORM))
    pushed = _pushed(model)
    wrappers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, ModulesToSaveWrapper)}
    assert len(wrappers) == 5  # 2 per layer + the final norm
    for name, wrapper in wrappers.items():
        assert torch.equal(pushed[f"{name}.weight"], wrapper.modules_to_save["default"].weight)
        assert not torch.equal(pushed[f"{name}.weight"], wrapper.original_module.weight)
    assert not any("modules_to_save" in k or "original_module" in k or "base_layer" in k for k in pushed)


def test_a_lora_bias_is_folded_into_a_base_bias(make_tiny_model):
    model = _peft_model(
        make_tiny_model(attention_bias=True), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True)
    )
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


def test_a_lora_bias_on_a_layer_without_bias_is_refused_in_one_line(make_tiny_model):
    """peft cannot merge it either: there is no base bias to add the trained one to."""
    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(RuntimeError, match="lora_bias"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy.deepcopy(model).merge_and_unload()
    message = _refused_push(model, r"lora_bias=True on model\.layers\.0\.self_attn\.q_proj")
    assert "--use_vllm false" in message and "lora_bias=False" in message


OTHER_TUNERS = {
    "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "adalora": lambda: peft.AdaLoraConfig(r=4, target_modules=["q_proj", "v_proj"], total_step=10),
    "oft": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj", "v_proj"]),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"]),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=64, target_modules=["q_proj", "v_proj"]),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"]),
}


@pytest.mark.parametrize("tuner", list(OTHER_TUNERS))
def test_other_weight_tuners_push_merge_and_unload(make_tiny_model, tuner):
    """No tuner-specific code: each layer is merged by peft itself, on a copy of that layer."""
    model = _peft_model(make_tiny_model(), OTHER_TUNERS[tuner]())
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


PROMPT_LEARNING = {
    "PROMPT_TUNING": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "PREFIX_TUNING": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "P_TUNING": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
}


@pytest.mark.parametrize("kind", list(PROMPT_LEARNING))
def test_prompt_learning_is_refused_before_and_after_the_model_loads(make_tiny_model, kind):
    config = PROMPT_LEARNING[kind]()
    message = _one_line_refusal(lambda: check_servable_peft(config), f"peft_type={kind} cannot be served")
    assert "--use_vllm false" in message
    _refused_push(_peft_model(make_tiny_model(), PROMPT_LEARNING[kind]()), f"peft_type={kind}")


def test_an_inactive_adapter_is_not_pushed(make_tiny_model):
    model = _peft_model(
        make_tiny_model(),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        ("other", peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"])),
    )
    assert model.active_adapters == ["default"]
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))
    model.set_adapter("other")
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


def test_two_active_adapters_are_both_pushed(make_tiny_model):
    """peft's forward then sums both adapters, and so does its merge."""
    model = _peft_model(
        make_tiny_model(),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        ("other", peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True)),
    )
    model.base_model.set_adapter(["default", "other"])
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


def test_disabled_adapters_still_push_the_trained_policy(make_tiny_model):
    """Inside ``disable_adapter()`` the model computes the base, but the trained policy is still the adapter's, as
    ``merge_and_unload`` says too."""
    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    expected = _pushed(model)
    with model.disable_adapter():
        _assert_pushes_merge_and_unload(model)
        pushed = _pushed(model)
    assert all(torch.equal(pushed[name], tensor) for name, tensor in expected.items())


def test_the_reference_adapter_is_never_pushed(make_tiny_model):
    """The trainer's frozen reference sits next to the policy adapter: only the policy reaches the engine, even if
    the reference is active too; with only the reference active there is no policy to push."""
    from trl_stepwise.models import REFERENCE_ADAPTER
    from trl_stepwise.trainer.reference import copy_policy_to_reference

    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=TARGETS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy_policy_to_reference(model, "default")
    _perturb(model)  # the reference now differs from the policy everywhere
    assert model.active_adapters == ["default"]
    _assert_pushes_merge_and_unload(model)
    policy = _pushed(model)
    model.base_model.set_adapter(["default", REFERENCE_ADAPTER])
    _assert_pushes_merge_and_unload(model, adapter_names=["default"])
    assert all(torch.equal(tensor, policy[name]) for name, tensor in _pushed(model).items())
    model.set_adapter(REFERENCE_ADAPTER)
    _refused_push(model, "Only the frozen reference adapter 'reference' is active")


def test_the_reference_adapter_next_to_modules_to_save(make_tiny_model):
    from trl_stepwise.trainer.reference import copy_policy_to_reference

    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=EVERY_NORM))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy_policy_to_reference(model, "default")
    _perturb(model)
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


def test_an_adapter_merged_in_place_is_not_added_twice(make_tiny_model):
    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.merge_adapter()
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


@pytest.mark.parametrize(
    ("setup", "why"),
    [
        (dict(target_modules=["embed_tokens", "q_proj"]), "only one of them is adapted"),
        (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), "only one of them is adapted"),
        (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), "trained apart"),
    ],
)
def test_adapting_one_of_tied_embeddings_is_refused(make_tiny_model, setup, why):
    """vLLM loads one matrix for tied embeddings; peft trains two here (and its merge_and_unload, in place on the
    shared tensor, is not even the trained policy for a LoRA on embed_tokens)."""
    model = _peft_model(make_tiny_model(tie_word_embeddings=True), peft.LoraConfig(r=4, **setup))
    message = _refused_push(model, "tie_word_embeddings=True")
    assert why in message and "--use_vllm false" in message


@pytest.mark.parametrize(
    "setup",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True),
        dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]),  # peft ties these by itself
    ],
)
def test_tied_adapters_on_tied_embeddings_are_pushed(make_tiny_model, setup):
    model = _peft_model(make_tiny_model(tie_word_embeddings=True), peft.LoraConfig(r=4, **setup))
    _assert_pushes_merge_and_unload(model)
    _assert_same_policy(model, _pushed(model))


def test_a_tied_lora_on_tied_embeddings_is_pushed(make_tiny_model):
    """``ensure_weight_tying`` with a LoRA on embed_tokens: peft cannot even deepcopy the model to merge it, so the
    pushed weights are checked against the peft model's own logits."""
    model = _peft_model(
        make_tiny_model(tie_word_embeddings=True),
        peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True),
    )
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pushed = _pushed(model)
    assert torch.equal(pushed["lm_head.weight"], pushed["model.embed_tokens.weight"])
    plain = type(model.get_base_model())(model.get_base_model().config)
    plain.load_state_dict(pushed)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_a_quantized_base_is_refused(make_tiny_model):
    model = _peft_model(make_tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.model.is_loaded_in_4bit = True
    message = _refused_push(model, "4/8-bit base cannot be served")
    assert "--use_vllm false" in message


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lambda: peft.LoraConfig(r=4, alora_invocation_tokens=[5, 6]), r"alora_invocation_tokens=\[5, 6\]"),
        (lambda: peft.LoraConfig(r=4, layer_replication=[[0, 2], [1, 2]]), "layer_replication="),
        (lambda: peft.PolyConfig(r=4, target_modules=["q_proj"]), "peft_type=POLY"),
        (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "peft_type=PREFIX_TUNING"),
        (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "peft_type=PROMPT_TUNING"),
        (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "peft_type=P_TUNING"),
    ],
)
def test_check_servable_peft_refuses_what_cannot_be_folded(config, match):
    message = _one_line_refusal(lambda: check_servable_peft(config()), match)
    assert "cannot be served with --use_vllm true" in message and "--use_vllm false" in message


@pytest.mark.parametrize(
    ("flags", "flag"), [({"load_in_4bit": True}, "--load_in_4bit"), ({"load_in_8bit": True}, "--load_in_8bit")]
)
def test_check_servable_peft_refuses_a_quantized_base(flags, flag):
    message = _one_line_refusal(lambda: check_servable_peft(peft.LoraConfig(r=4), **flags), f"{flag} true cannot")
    assert f"{flag} false" in message and "--use_vllm false" in message


@pytest.mark.parametrize(
    "config",
    [
        None,
        peft.LoraConfig(r=4),
        peft.LoraConfig(r=4, use_dora=True, use_rslora=True, modules_to_save=["lm_head"]),
        peft.LoraConfig(r=4, lora_bias=True),
        peft.LoraConfig(r=4, target_modules="all-linear", trainable_token_indices=[1, 2]),
        peft.IA3Config(),
        peft.LoHaConfig(),
        peft.LoKrConfig(),
        peft.VeraConfig(),
        peft.AdaLoraConfig(total_step=10),
    ],
)
def test_check_servable_peft_accepts_foldable_set_ups(config):
    check_servable_peft(config)


def test_a_model_without_peft_is_pushed_as_is(make_tiny_model):
    model = make_tiny_model()
    with policy_weights(model) as weights:
        pushed = dict(weights)
    assert sorted(pushed) == sorted(model.state_dict())
    check_servable_model(model)


def test_the_embedded_model_with_dora_and_modules_to_save(tmp_path):
    """The measured gaps of the old push on the real model: DoRA magnitudes left out, every norm layer saved as a
    module (all 61) never sent. Both now equal merge_and_unload."""
    from trl_stepwise.models import load_model

    torch.manual_seed(0)
    model = _peft_model(
        load_model(None).float(),
        peft.LoraConfig(r=8, target_modules="all-linear", use_dora=True, modules_to_save=EVERY_NORM),
    )
    assert sum(isinstance(m, ModulesToSaveWrapper) for m in model.modules()) == 61
    _assert_pushes_merge_and_unload(model)


class _FakeZero3:
    """What ZeRO-3 does to parameters, without DeepSpeed (which needs a GPU or oneCCL): each parameter is marked
    ``ds_id`` and holds an empty placeholder, its whole data back only inside ``GatheredParameters``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.gathered: list[int] = []  # how many parameters each gathering held
        self.whole = {}
        for number, param in enumerate(model.parameters()):
            param.ds_id = number
            self.whole[id(param)] = param.data
            param.data = torch.empty(0)
        fake = self

        class GatheredParameters:
            def __init__(self, params, modifier_rank=None) -> None:
                self.params = list(params)
                assert all(hasattr(p, "ds_id") for p in self.params) and modifier_rank is None

            def __enter__(self):
                fake.gathered.append(len(self.params))
                for param in self.params:
                    param.data = fake.whole[id(param)]

            def __exit__(self, *exc) -> None:
                for param in self.params:
                    param.data = torch.empty(0)

        self.module = type(sys)("deepspeed")
        self.module.zero = type(sys)("deepspeed.zero")
        self.module.zero.GatheredParameters = GatheredParameters


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_zero3_partitions_are_pushed_whole_one_module_at_a_time(make_tiny_model, monkeypatch, adapter):
    model = make_tiny_model()
    if adapter:
        model = _peft_model(model, peft.LoraConfig(target_modules=TARGETS))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = copy.deepcopy(model).merge_and_unload().state_dict()
    else:
        expected = {k: v.clone() for k, v in model.state_dict().items()}
    zero3 = _FakeZero3(model)
    monkeypatch.setitem(sys.modules, "deepspeed", zero3.module)
    pushed = _pushed(model)
    assert list(pushed) == list(expected)  # the state dict's names, in its order
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert zero3.gathered and max(zero3.gathered) <= 4  # a module (or one adapted layer) at a time, never the model
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned again afterwards
