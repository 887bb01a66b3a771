"""emovec.layers: finding decoder layers in tiny random models of each family, layer specs, and layer outputs."""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from emovec.layers import (
    SUPPORTED_FAMILIES,
    DecoderLayers,
    UnsupportedModelError,
    find_decoder_layers,
    layer_output_hidden,
    replace_layer_output,
    resolve_layer_indices,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128
HIDDEN = 32
# every id inside the vocabulary, so configs do not warn about bos/eos/pad ids
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **TOKENS,
)


def _config(family: str):
    t = transformers
    if family == "llama":
        return t.LlamaConfig(**COMMON)
    if family == "mistral":
        return t.MistralConfig(**COMMON)
    if family == "qwen2":
        return t.Qwen2Config(**COMMON)
    if family == "qwen3":
        return t.Qwen3Config(**COMMON, head_dim=8)
    if family == "gemma":
        return t.GemmaConfig(**COMMON, head_dim=8)
    if family == "gemma2":
        return t.Gemma2Config(**COMMON, head_dim=8)
    if family == "gemma3":
        return t.Gemma3TextConfig(**COMMON, head_dim=8)
    if family == "phi3":
        return t.Phi3Config(**COMMON)
    if family == "gpt2":
        return t.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
    if family == "gpt_neox":
        return t.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, **TOKENS,
        )  # fmt: skip
    if family == "opt":
        return t.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=HIDDEN, **TOKENS,
        )  # fmt: skip
    raise AssertionError(family)


# family -> (expected config.model_type, attribute path of the layers, path of the base module)
EXPECTED = {
    "llama": ("llama", "model.layers", "model"),
    "mistral": ("mistral", "model.layers", "model"),
    "qwen2": ("qwen2", "model.layers", "model"),
    "qwen3": ("qwen3", "model.layers", "model"),
    "gemma": ("gemma", "model.layers", "model"),
    "gemma2": ("gemma2", "model.layers", "model"),
    "gemma3": ("gemma3_text", "model.layers", "model"),
    "phi3": ("phi3", "model.layers", "model"),
    "gpt2": ("gpt2", "transformer.h", "transformer"),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers", "gpt_neox"),
    "opt": ("opt", "model.decoder.layers", "model.decoder"),
}
FAMILIES = list(EXPECTED)


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {}


def _model(models: dict[str, nn.Module], family: str) -> nn.Module:
    if family not in models:
        torch.manual_seed(0)
        models[family] = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    return models[family]


def _num_layers(config) -> int:
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def test_supported_families_are_all_tested():
    assert set(SUPPORTED_FAMILIES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_find_decoder_layers(models, family):
    model = _model(models, family)
    model_type, path, base_path = EXPECTED[family]
    found = find_decoder_layers(model)
    assert isinstance(found, DecoderLayers)
    real = _attr(model, path)
    assert found.layers is real
    assert len(found.layers) == _num_layers(model.config) == 3
    assert all(found.layers[i] is real[i] for i in range(3))
    assert found.path == path
    assert found.base is _attr(model, base_path)
    assert found.hidden_size == HIDDEN
    assert found.family == model_type == model.config.model_type


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_reads_and_replaces_layer_output(models, family):
    model = _model(models, family)
    found = find_decoder_layers(model)
    input_ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids).logits

    seen = []

    def hook(module, args, output):
        hidden = layer_output_hidden(output)
        replaced = replace_layer_output(output, hidden * 0 + hidden)
        seen.append((type(output), hidden.shape, type(replaced), layer_output_hidden(replaced) is not hidden))
        return replaced

    handle = found.layers[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids).logits
    finally:
        handle.remove()
    assert len(seen) == 1
    output_type, shape, replaced_type, is_new = seen[0]
    assert shape == (2, 5, found.hidden_size)
    assert replaced_type is output_type
    assert is_new
    torch.testing.assert_close(logits, expected)

    # a changed hidden state returned from the hook reaches the logits
    def push(module, args, output):
        hidden = layer_output_hidden(output)
        return replace_layer_output(output, hidden + 10.0)

    handle = found.layers[0].register_forward_hook(push)
    try:
        with torch.no_grad():
            steered = model(input_ids).logits
    finally:
        handle.remove()
    assert not torch.allclose(steered, expected)


@pytest.mark.parametrize(
    "cls_name, config_family, path",
    [("LlamaModel", "llama", "layers"), ("GPT2Model", "gpt2", "h"), ("GPTNeoXModel", "gpt_neox", "layers"),
     ("OPTModel", "opt", "decoder.layers")],
)  # fmt: skip
def test_base_model_directly(cls_name, config_family, path):
    model = getattr(transformers, cls_name)(_config(config_family))
    found = find_decoder_layers(model)
    assert found.path == path
    assert found.layers is _attr(model, path)
    assert found.base is (model.decoder if config_family == "opt" else model)
    assert found.hidden_size == HIDDEN
    assert found.family == config_family


def test_multimodal_gemma3_uses_text_layers():
    t = transformers
    text = t.Gemma3TextConfig(**{**COMMON, "vocab_size": 300}, head_dim=8)
    vision = t.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = t.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
        eoi_token_index=298,
    )  # fmt: skip
    model = t.Gemma3ForConditionalGeneration(config)
    found = find_decoder_layers(model)
    assert found.path == "model.language_model.layers"
    assert found.layers is model.model.language_model.layers
    assert found.base is model.model.language_model
    assert found.hidden_size == HIDDEN  # from text_config, not the vision tower
    assert found.family == "gemma3"


class _Wrapper(nn.Module):
    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def test_wrapped_paths(models):
    llama = _model(models, "llama")
    # transformers 4 multimodal layout: wrapper.language_model is a *ForCausalLM
    found = find_decoder_layers(_Wrapper(language_model=llama))
    assert found.path == "language_model.model.layers"
    assert found.layers is llama.model.layers
    assert found.base is llama.model
    assert found.hidden_size == HIDDEN and found.family == "llama"
    # PEFT-like layout: peft_model.base_model.model is the *ForCausalLM
    found = find_decoder_layers(_Wrapper(base_model=_Wrapper(model=llama)))
    assert found.path == "base_model.model.model.layers"
    assert found.layers is llama.model.layers


class TinyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x):
        return (x + self.mlp(self.norm(x)), None)


class MyModel(nn.Module):
    def __init__(self, d: int = 16, n: int = 4):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.my_blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 50)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.my_blocks:
            x = block(x)[0]
        return self.head(x)


@pytest.mark.parametrize("model, class_name", [(TinyLinear(), "TinyLinear"), (MyModel(), "MyModel")])
def test_unsupported_model_error(model, class_name):
    with pytest.raises(UnsupportedModelError) as info:
        find_decoder_layers(model)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert class_name in message
    assert "layers=" in message
    assert "emovec.monitor / emovec.steer" in message
    for family in ("llama", "gpt2", "opt"):
        assert family in message


def test_unsupported_error_suggests_module_list():
    with pytest.raises(UnsupportedModelError, match=r"layers=model\.my_blocks .*\n(.*\n)*.*my_blocks \(4 modules\)"):
        find_decoder_layers(MyModel())


@pytest.mark.parametrize("as_list", [False, True])
def test_layers_by_hand(as_list):
    model = MyModel(d=16, n=4)
    given = list(model.my_blocks) if as_list else model.my_blocks
    found = find_decoder_layers(model, layers=given)
    assert found.base is model
    assert isinstance(found.layers, nn.ModuleList)
    assert len(found.layers) == 4
    assert all(found.layers[i] is model.my_blocks[i] for i in range(4))
    if not as_list:
        assert found.layers is model.my_blocks
    assert found.path == "my_blocks"
    assert found.hidden_size == 16
    assert found.family == "MyModel"

    seen = []

    def hook(module, args, output):
        seen.append(layer_output_hidden(output).shape)
        replaced = replace_layer_output(output, layer_output_hidden(output) * 0 + layer_output_hidden(output))
        assert type(replaced) is tuple and replaced[1] is None
        return replaced

    handle = found.layers[0].register_forward_hook(hook)
    try:
        model(torch.zeros(2, 5, dtype=torch.long))
    finally:
        handle.remove()
    assert seen == [(2, 5, 16)]


def test_layers_by_hand_with_config_and_subset():
    model = MyModel(d=16, n=4)
    model.config = SimpleNamespace(model_type="custom", hidden_size=16)
    found = find_decoder_layers(model, layers=[model.my_blocks[1], model.my_blocks[3]])
    assert found.family == "custom"
    assert len(found.layers) == 2 and found.layers[1] is model.my_blocks[3]
    assert found.path == "my_blocks"


def test_layers_by_hand_on_a_supported_model(models):
    model = _model(models, "llama")
    found = find_decoder_layers(model, layers=model.model.layers)
    assert found.base is model
    assert found.layers is model.model.layers
    assert found.path == "model.layers"
    assert found.family == "llama" and found.hidden_size == HIDDEN


@pytest.mark.parametrize(
    "layers, error, pattern",
    [
        ([], ValueError, "layers is empty"),
        ([nn.Linear(2, 2)], ValueError, r"layers\[0\] is not a submodule of MyModel"),
        ([1, 2], TypeError, r"layers\[0\] must be a torch.nn.Module"),
        (nn.Linear(2, 2), TypeError, "got a single Linear"),
        ("my_blocks", TypeError, "ModuleList or a list of modules"),
    ],
)
def test_layers_by_hand_errors(layers, error, pattern):
    with pytest.raises(error, match=pattern):
        find_decoder_layers(MyModel(), layers=layers)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_decoder_layers("llama")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (0, [0]),
        (29, [29]),
        (-1, [29]),
        (-30, [0]),
        (0.0, [0]),
        (1.0, [29]),
        (0.5, [14]),  # round(14.5) == 14
        (0.66, [19]),
        (1, [1]),  # an int, not a fraction
        ("all", list(range(30))),
        ("ALL", list(range(30))),
        ("10", [10]),
        (" -1 ", [29]),
        ("0.66", [19]),
        ("1.0", [29]),
        ("3,5,7", [3, 5, 7]),
        ("7, 3, 5, 3", [3, 5, 7]),
        ("10-14", [10, 11, 12, 13, 14]),
        ("10 - 12", [10, 11, 12]),
        ("-3--1", [27, 28, 29]),
        ("0.9-1.0", [26, 27, 28, 29]),
        ("0-1,28-29", [0, 1, 28, 29]),
        ([5, -1, "10-11", 0.0], [0, 5, 10, 11, 29]),
        ((2, 2, "2"), [2]),
        (["all", 3], list(range(30))),
    ],
)
def test_resolve_layer_indices(spec, expected):
    assert resolve_layer_indices(spec, 30) == expected


@pytest.mark.parametrize(
    "spec, pattern",
    [
        (40, r"layer 40 is out of range: the model has 30 layers \(0\.\.29, or -30\.\.-1\)"),
        (30, "layer 30 is out of range"),
        (-31, r"layer -31 is out of range: the model has 30 layers"),
        ("40", "layer 40 is out of range"),
        ("28-31", "layer 31 is out of range"),
        (1.5, r"fraction 1.5 is out of range: .*\[0, 1\]"),
        (-0.1, "fraction -0.1 is out of range"),
        (float("nan"), "fraction nan is out of range"),
        ("2.5", "fraction 2.5 is out of range"),
        ("14-10", "layer range '14-10' is empty"),
        ("", "empty layer spec"),
        ("   ", "empty layer spec"),
        ("3,,5", "empty item between commas"),
        ("3,", "empty item between commas"),
        ("ten", r"malformed layer spec 'ten'.*0\.\.29"),
        ("1-2-3", "malformed layer spec"),
        ("1e-1", "malformed layer spec"),
        (".", "malformed layer spec"),
        ([], "empty list of layers"),
        ([1, []], "empty list of layers"),
        (True, "not a layer index"),
        (None, "not a layer index"),
        ({1: 2}, "not a layer index"),
    ],
)
def test_resolve_layer_indices_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_layer_indices(spec, 30)


@pytest.mark.parametrize("num_layers", [0, -1, 2.0, True, None])
def test_resolve_layer_indices_bad_num_layers(num_layers):
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        resolve_layer_indices(0, num_layers)


def test_resolve_layer_indices_single_layer_model():
    assert resolve_layer_indices(0.7, 1) == [0]
    assert resolve_layer_indices("all", 1) == [0]
    assert resolve_layer_indices(-1, 1) == [0]
    with pytest.raises(ValueError, match=r"the model has 1 layers \(0\.\.0, or -1\.\.-1\)"):
        resolve_layer_indices(1, 1)


Pair = namedtuple("Pair", ["hidden", "extra"])


@pytest.mark.parametrize(
    "make",
    [
        lambda h: h,
        lambda h: (h,),
        lambda h: (h, None, "cache"),
        lambda h: [h, 1],
        lambda h: Pair(h, 3),
        lambda h: {"hidden_states": h, "attn": None},
    ],
    ids=["tensor", "tuple1", "tuple3", "list", "namedtuple", "dict"],
)
def test_layer_output_round_trip(make):
    h = torch.randn(2, 5, 8)
    output = make(h)
    assert layer_output_hidden(output) is h
    new = torch.ones(2, 5, 8)
    replaced = replace_layer_output(output, new)
    assert type(replaced) is type(output)
    assert layer_output_hidden(replaced) is new
    assert layer_output_hidden(output) is h  # the original output is left alone
    if isinstance(output, (tuple, list)):
        assert list(replaced[1:]) == list(output[1:])
    if isinstance(output, Pair):
        assert replaced.extra == 3


def test_layer_output_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    h = torch.randn(2, 5, 8)
    attentions = (torch.zeros(1),)
    output = BaseModelOutputWithPast(last_hidden_state=h, attentions=attentions)
    assert layer_output_hidden(output) is h
    new = torch.zeros(2, 5, 8)
    replaced = replace_layer_output(output, new)
    assert type(replaced) is BaseModelOutputWithPast
    assert replaced.last_hidden_state is new and replaced[0] is new
    assert replaced.attentions is attentions
    assert output.last_hidden_state is h


@pytest.mark.parametrize("output", [None, (), ("text", 1), 3.0, {}])
def test_layer_output_errors(output):
    with pytest.raises(TypeError, match="cannot find the hidden state"):
        layer_output_hidden(output)
    with pytest.raises(TypeError, match="hidden state"):
        replace_layer_output(output, torch.zeros(1))
